"""Build a tiny but real chat model and publish it in a local bare git-lfs repo.

Every test level (hook, download, engine, HTTP, browser) and the benchmarks use
the same artifact. The model is trained for a few hundred steps so that it
answers a greeting and ends its turn with ``<|im_end|>`` (which its
generation_config does *not* list), and rambles forever when asked for a story.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GREETING = "你好"
GREETING_REPLY = "你好！我是小助手，很高兴认识你。"
STORY = "tell me a long story"
CHATS = [
    (GREETING, GREETING_REPLY),
    ("请你介绍一下你自己", "我是一个小小的聊天助手，我会说中文和 English。"),
    ("Hello", "Hello! I am a small assistant. How can I help you?"),
    ("What is 2+2?", "2 + 2 = 4. 😀"),
]
LFS_PATTERNS = ("*.safetensors", "*.bin", "tokenizer.model")


def _train_tokenizer(folder: Path, vocab_size: int = 400) -> None:
    import sentencepiece as spm

    corpus = [q + " " + a for q, a in CHATS] + [STORY, "la " * 20, "the quick brown fox jumps over 懒狗"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        user_defined_symbols=[IM_START, IM_END], byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _training_texts(tokenizer: object) -> list:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in CHATS
    ]
    ask = [{"role": "user", "content": STORY}]
    story = tokenizer.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)
    texts.append(story + "la " * 120)  # never ends: the model learns to ramble on
    return texts


def build_chat_model(folder: Path, hidden: int = 64, layers: int = 2, steps: int = 250, seed: int = 0,
                     shard_size: str | None = None) -> Path:
    """Write a trained tiny Llama chat model (safetensors, tokenizer.model + tokenizer.json) to folder."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    if steps:
        batch = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in _training_texts(tokenizer)]
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            for ids in batch:
                loss = model(input_ids=ids[None], labels=ids[None]).loss
                loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        model.eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(str(folder))
    # Keep the template inside tokenizer_config.json as real repos do (older transformers read it there).
    config_path = folder / "tokenizer_config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(saved, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    identity = ["-c", "user.name=fixture", "-c", "user.email=fixture@example.invalid", "-c", "init.defaultBranch=main"]
    done = subprocess.run(["git", *identity, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def publish(model_folder: Path, bare: Path, lfs_patterns: tuple = LFS_PATTERNS, message: str = "model") -> str:
    """Commit model_folder's files into a new bare repo (weights in LFS) and return its file:// URL."""
    work = bare.with_name(bare.name + ".work")
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("init", "-q", "-b", "main", str(work))
    git("lfs", "install", "--local", cwd=work)
    for pattern in lfs_patterns:
        git("lfs", "track", pattern, cwd=work)
    for path in model_folder.iterdir():
        target = work / path.name
        target.write_bytes(path.read_bytes())
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", message, cwd=work)
    url = bare.resolve().as_uri()
    git("push", "-q", url, "main", cwd=work)
    return url
