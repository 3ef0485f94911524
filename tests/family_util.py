"""Builders shared by the model-family tests (nothing is downloaded): byte-level BPE tokenizers in the style of
LLaMA-3, Qwen2.5 and Mistral v0.3 trained on a small corpus, checkpoint directories carrying the real chat
templates of tests/data/chat_templates/, and tiny random transformers models of each family.

Used by test_tokenizer_json.py, test_chat_template.py, test_family_parity.py and test_family_train.py.
"""
import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "data" / "chat_templates"

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [f"Sam has {i} apples and buys {i * 3 + 7} more. How many apples does Sam have now?\nThe answer is: "
          f"{i * 4 + 7}" for i in range(300)] + [
    "Let $x^2 + 3x = 10$. Then \\frac{a}{b} = \\sqrt{2}, and π ≈ 3.14159.", "ünïcödé 中文 日本語 🙂 emoji",
    "  leading spaces\ttabs\r\nwindows lines", "I'm sure they've said it's theirs; we'd go, you'll see."]
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits every digit


def _bpe(specials: list[str], pre_tokenizer, post_processor, vocab_size=600, normalizer=None):
    from tokenizers import Tokenizer as T, decoders, models, pre_tokenizers, trainers

    tok = T(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if post_processor is not None:
        tok.post_processor = post_processor(tok)
    return tok


def make_llama3(path):
    from tokenizers import Regex, pre_tokenizers, processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>",
                "<|end_header_id|>"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    post = lambda tok: processors.TemplateProcessing(  # noqa: E731
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok = _bpe(specials, pre, post)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True, "model_max_length": 131072}))
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.token_to_id("<|begin_of_text|>"),
                                                             "eos_token_id": ids}))
    return ids


def make_qwen2(path):
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    # Qwen2.5's pipeline (transformers 5 rebuilds a Qwen2Tokenizer's pipeline from its class, so it must be it)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _bpe(specials, pre, lambda tok: processors.ByteLevel(trim_offsets=False), normalizer=normalizers.NFC())
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "clean_up_tokenization_spaces": False,
        "errors": "replace", "model_max_length": 131072}))
    return [tok.token_to_id("<|im_end|>")]


def make_mistral(path):
    """A byte-level stand-in for Mistral v0.3's tokenizer.json: <s> added by the post-processor, [INST] tokens."""
    from tokenizers import pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
    tok = _bpe(specials, pre_tokenizers.ByteLevel(add_prefix_space=False), lambda t: processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", t.token_to_id("<s>"))]))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


CHAT_FAMILIES = {"llama3.1-8b-instruct": make_llama3, "mistral-7b-instruct-v0.3": make_mistral,
                 "qwen2.5-instruct": make_qwen2}


def make_chat_dir(name: str, path: Path) -> Path:
    """A tokenizer directory of family `name` (a key of CHAT_FAMILIES) with that family's real chat template and
    special tokens from tests/data/chat_templates/<name>.json in its tokenizer_config.json."""
    CHAT_FAMILIES[name](path)
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update({k: fixture[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")})
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


V = 97
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    # LLaMA-3.2-like: GQA, tied, llama3 rope scaling, head_dim 24 != hidden / heads
    "llama3-gqa-tied": ("LlamaConfig", "LlamaForCausalLM",
                        dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                             rope_parameters=LLAMA3_ROPE, max_position_embeddings=128)),
    # Mistral v0.1-like: MHA, untied, a 4096 window no test sequence reaches; saved sharded
    "mistral-mha": ("MistralConfig", "MistralForCausalLM",
                    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, sliding_window=4096, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen2.5-like: GQA, untied, q/k/v biases, sliding_window given but use_sliding_window false
    "qwen2-gqa": ("Qwen2Config", "Qwen2ForCausalLM",
                  dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=False,
                       sliding_window=32, rms_norm_eps=1e-6)),
    # Qwen2.5-1.5B-like: MHA, tied, biases
    "qwen2-mha-tied": ("Qwen2Config", "Qwen2ForCausalLM",
                       dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, tie_word_embeddings=True, use_sliding_window=False)),
}


def make_hf(kind, seed=0, vocab_size=V, **overrides):
    """transformers' model of family `kind` with random weights (norms and biases too); `overrides` change its
    config (e.g. max_position_embeddings)."""
    import torch
    import transformers

    config_cls, _, kwargs = FAMILIES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=vocab_size, **{**kwargs, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms and biases random, so a dropped one would show
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model
