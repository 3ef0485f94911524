from setuptools import setup

setup(
    name="fastmath",
    version="0.1.0",
    description="Custom-kernel LLaMA-family trainer and 256-sample sampler for math reasoning (the Xwin-Math recipe)",
    python_requires=">=3.10",
    packages=["fastmath", "fastmath.commands", "fastmath.engine", "fastmath.eval", "fastmath.serve", "fastmath.synth",
              "fastmath.train", "fastmath.kernels"],
    package_dir={"fastmath.kernels": "kernels"},  # kernels/ is fastmath.kernels; never a top-level `kernels`
    package_data={"fastmath": ["schemas/*.json"]},
    install_requires=[
        "torch>=2.4",  # never pinned: GPU users bring their own CUDA build
        "triton>=3.0; platform_system == 'Linux'",
        "sentencepiece>=0.1.99",
        "tokenizers>=0.19",  # tokenizer.json checkpoints (LLaMA-3.x, Qwen2.5): byte-level BPE
        "jinja2>=3.1.6",  # checkpoints' chat templates, sandboxed (older versions have known sandbox escapes)
        "safetensors>=0.4",
        "numpy>=1.24",
        "sympy>=1.12",
        "click>=8.1",
        "tqdm>=4.64",
        "pyyaml>=6.0",
        "tomli>=1.1; python_version < '3.11'",  # TOML training configs (tomllib is built in from 3.11)
        "jsonschema>=4.0",
        "matplotlib>=3.6",
        "openai>=1.0",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.25"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],  # `fastmath serve` (FastAPI + uvicorn, as vLLM's server)
        "tensorboard": ["tensorboard>=2.10"],  # --report-to tensorboard
        "wandb": ["wandb>=0.15"],  # --report-to wandb
        # peft is not needed at run time (fastmath writes PEFT's adapter format itself); tests load it with peft
        "test": ["pytest>=7.0", "transformers>=4.40", "math-verify>=0.5", "fastapi>=0.110", "uvicorn>=0.29",
                 "httpx>=0.25", "lm-eval[api]>=0.4.10", "peft>=0.10", "tensorboard>=2.10",
                 "wandb>=0.15"],
    },
    entry_points={"console_scripts": ["fastmath=fastmath.cli:main"]},
)
