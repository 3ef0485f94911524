"""`fastmath info`."""
import platform

import click


@click.command(name="info")
def command():
    """Print versions, device, which attention backend runs and whether Triton kernels are used."""
    import torch

    import fastmath
    from fastmath import attention
    from fastmath.kernels import kernel_status

    def version(name):
        try:
            return __import__(name).__version__
        except Exception:
            return "not installed"

    rows = [
        ("fastmath", fastmath.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", version("triton")),
        ("transformers", version("transformers")),
        ("flash-attn", version("flash_attn")),
        ("xformers", version("xformers")),
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda x{torch.cuda.device_count()} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    rows.append(("device", device))
    rows.append(("attention", attention.describe_backends()))
    rows.append(("kernels", kernel_status()))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
