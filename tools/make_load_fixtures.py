"""Build the checkpoint-matrix fixtures of tests/test_load_*.py, one per Llama-family style.

    .venv-peer/bin/python tools/make_load_fixtures.py      # torch, transformers,
                                                            # sentencepiece installed

Each `tests/fixtures/load_<style>/` is a Hugging Face directory written the way transformers
writes one (`save_pretrained`: config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) around a tiny random model and a tokenizer trained here
on the repository's README (so the vocabulary is real BPE, not a toy):

- llama2:  LlamaForCausalLM, SentencePiece BPE (byte fallback, `<s>` BOS), Llama-2 chat template.
- llama3:  LlamaForCausalLM, byte-level BPE with Llama-3's split regex and ignore_merges, BOS by
           the post-processor, llama3 RoPE scaling, three end tokens, Llama-3 chat template.
- smollm2: LlamaForCausalLM, byte-level BPE with single digits, ChatML, tied embeddings.
- mistral: MistralForCausalLM, SentencePiece with [INST]/[/INST] control tokens, GQA, theta 1e6.

Golden values written beside them, all from the peer (the runtime's own code):
`tokens.npy` [B, S] and `logits.npy` [B, S, V] from transformers' eager PyTorch forward (plus
`logits_linear.npy` for the llama2 weights under linear RoPE scaling, factor 4), `golden.json`
with the token ids of probe texts from `AutoTokenizer` (and SentencePiece itself where it
applies) and the chat prompt ids of `apply_chat_template(tokenize=True)`, and, for the
SentencePiece styles, `spm_vocab.json` (pieces, scores, types as llama.cpp's converter reads
them from tokenizer.model) so tests can write the GGUF. Deterministic seeds.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = ROOT / "README.md"
B, S = 2, 20

PROBES = [
    "hello",
    "Hello world! 12345 and 3.14159",
    "IT'S it's we'LL they've",
    "  two leading spaces\tand a tab\nnew line\n\n",
    "café naïve 東京 🙂",
    "x=a+b<=c; y^~|z $100",
]
CHAT = [{"role": "user", "content": "Hi there, 12345!"}]

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    rms_norm_eps=1e-5,
)


def _spm(work: Path, control: list[str]):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(CORPUS),
        model_prefix=str(work / "sp"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        control_symbols=control,
        split_digits=True,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
    )
    return spm.SentencePieceProcessor(model_file=str(work / "sp.model"))


def _spm_vocab(sp) -> dict:
    """Pieces, scores and llama.cpp token types, as convert_hf_to_gguf reads tokenizer.model."""
    types = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    n = sp.get_piece_size()
    return {
        "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "types": types,
    }


def spm_tokenizer(out: Path, work: Path, control: list[str], template: str):
    from transformers import AutoTokenizer

    sp = _spm(work, control)
    src = work / "hf_spm"
    src.mkdir()
    shutil.copy(work / "sp.model", src / "tokenizer.model")
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
    }
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(src))
    if control:
        tok.add_special_tokens({"additional_special_tokens": control})
    tok.chat_template = template
    tok.save_pretrained(str(out))
    (out / "spm_vocab.json").write_text(json.dumps(_spm_vocab(sp)))
    return tok, sp


def bpe_tokenizer(out: Path, style: str):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=True, use_regex=style != "llama3"
    )
    if style == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated"), byte_level]
        )
        specials = []
    else:  # smollm2
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(CORPUS)], trainer)
    if style == "llama3":  # Llama-3's specials follow the regular vocabulary
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS]
        )
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
        names = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        template = LLAMA3_TEMPLATE
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        names = dict(
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            unk_token="<|endoftext|>",
            pad_token="<|im_end|>",
        )
        template = SMOLLM2_TEMPLATE
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = template
    fast.save_pretrained(str(out))
    if style == "llama3":  # as Llama-3.x ships it: the template inside tokenizer_config.json
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc.update(chat_template=template, tokenizer_class="PreTrainedTokenizerFast")
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        (out / "chat_template.jinja").unlink()
        fast = AutoTokenizer.from_pretrained(str(out))
    return fast


def randomize_(model, seed: int) -> None:
    """Unit-scale random weights (HF's 0.02 init gives near-zero logits that hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def _logits(model_dir: Path, tokens) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return m(
            input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False
        ).logits.numpy()


def model(out: Path, arch: str, config: dict, seed: int, gen_eos) -> None:
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    cls_cfg, cls = (
        (MistralConfig, MistralForCausalLM)
        if arch == "mistral"
        else (LlamaConfig, LlamaForCausalLM)
    )
    torch.manual_seed(seed)
    m = cls(cls_cfg(**config)).float().eval()
    randomize_(m, seed)
    m.generation_config = GenerationConfig(
        bos_token_id=config["bos_token_id"], eos_token_id=gen_eos
    )
    m.save_pretrained(str(out), safe_serialization=True)


def _chat_ids(tok) -> list[int]:
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _spm_chat_llama_cpp(tok, sp) -> list[int]:
    """The chat prompt as llama.cpp tokenizes it for a SentencePiece GGUF, with SentencePiece
    doing the merges: the rendered leading BOS dropped for the one add_bos adds, the text split
    at control tokens, and every text piece given the space prefix (llama-vocab.cpp adds one
    after each special token, where transformers adds none)."""
    import re

    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    text = text.removeprefix(tok.bos_token)
    specials = sorted(tok.all_special_tokens, key=len, reverse=True)
    ids = [tok.bos_token_id]
    for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if piece in specials:
            ids.append(tok.convert_tokens_to_ids(piece))
        elif piece:
            ids += sp.encode(piece)
    return ids


def build(style: str, seed: int) -> None:
    out = FIXTURES / f"load_{style}"
    work = Path(tempfile.gettempdir()) / f"load_fixture_{style}"
    for d in (out, work):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    sp = None
    if style in ("llama2", "mistral"):
        control = ["[INST]", "[/INST]"] if style == "mistral" else []
        tmpl = MISTRAL_TEMPLATE if style == "mistral" else LLAMA2_TEMPLATE
        tok, sp = spm_tokenizer(out, work, control, tmpl)
    else:
        tok = bpe_tokenizer(out, style)
    V = len(tok)
    cfg = dict(
        SMALL,
        vocab_size=V,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    gen_eos = tok.eos_token_id
    if style == "llama2":
        cfg.update(num_key_value_heads=4, rope_theta=10000.0)
    elif style == "mistral":
        cfg.update(num_key_value_heads=1, rope_theta=1e6, sliding_window=None)
    elif style == "llama3":
        ends = [
            tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        ]
        cfg.update(
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=500000.0,
            eos_token_id=ends,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        )
        gen_eos = ends
    else:  # smollm2
        cfg.update(num_key_value_heads=2, rope_theta=100000.0, tie_word_embeddings=True)
    model(out, "mistral" if style == "mistral" else "llama", cfg, seed, gen_eos)
    tokens = np.random.default_rng(seed).integers(0, V, size=(B, S), dtype=np.int32)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "logits.npy", _logits(out, tokens).astype(np.float32))
    if style == "llama2":  # the same weights under linear RoPE scaling
        lin = work / "linear"
        shutil.copytree(out, lin)
        c = json.loads((lin / "config.json").read_text())
        c["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
        c.pop("rope_parameters", None)
        c["rope_theta"] = 10000.0
        (lin / "config.json").write_text(json.dumps(c))
        np.save(out / "logits_linear.npy", _logits(lin, tokens).astype(np.float32))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))  # as users load it, from the saved files
    golden = {"probes": {}, "chat": _chat_ids(tok), "vocab_size": V}
    golden["chat_llama_cpp"] = golden["chat"] if sp is None else _spm_chat_llama_cpp(tok, sp)
    for text in PROBES:
        entry = {"hf": [int(i) for i in tok(text).input_ids]}
        if sp is not None:
            entry["sentencepiece"] = [tok.bos_token_id] + sp.encode(text)
        golden["probes"][text] = entry
    (out / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False))
    size = sum(p.stat().st_size for p in out.iterdir())
    print(
        f"{style}: V={V} {size / 1024:.0f} KiB logits std {np.load(out / 'logits.npy').std():.2f}"
        f" files {sorted(p.name for p in out.iterdir())}"
    )


def main() -> None:
    torch.set_num_threads(2)
    styles = sys.argv[1:] or ["llama2", "llama3", "smollm2", "mistral"]
    for seed, style in enumerate(["llama2", "llama3", "smollm2", "mistral"]):
        if style in styles:
            build(style, 100 + seed)


if __name__ == "__main__":
    main()
