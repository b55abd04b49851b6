"""Check a model repo before anyone deploys it, without downloading the weights.

Standard library only. The template's post-generation hook, the app's pre-flight
check and ``python -m xlab_chat check [--hardware …]`` all use it.

The repo is listed with a shallow clone whose LFS files stay pointer files
(GIT_LFS_SKIP_SMUDGE), so sizes come from the pointers; every git step runs
under one overall time bound (``MODEL_CHECK_TIMEOUT`` seconds, at most 60) with
prompts disabled. The result is a checklist, one line per check:

    ✓ passed   ⚠ worth a look (generation goes on)   ✗ the app would fail (generation stops)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .adapter_check import check_adapter_repo, is_adapter
from .git_tools import RepoError, git_env, read_pointer, run_git, working_files
from .lfs_objects import LFSUnanswered, check_objects
from .platform_tiers import GB, NAMES, chosen_platforms, cpu_tiers
from .repo_url import LOCAL, MODELSCOPE, RepoURLError, normalise
from .source import resolve_source, same_host

MAX_TIMEOUT = 60.0  # an unreachable or stalled host ends the whole check within this bound
DEFAULT_TIMEOUT = 45.0  # leaves room under MAX_TIMEOUT for the local steps and the cleanup
TIMEOUT_ENV = "MODEL_CHECK_TIMEOUT"

OK, WARN, FAIL, SKIP, INFO = "ok", "warn", "fail", "skip", "info"
SYMBOLS = {OK: "✓", WARN: "⚠", FAIL: "✗", SKIP: "–", INFO: "·"}
ASCII_SYMBOLS = {OK: "[ok]", WARN: "[warn]", FAIL: "[FAIL]", SKIP: "[-]", INFO: "[i]"}

LATER = "run `python -m xlab_chat check` in the app folder once the host can be reached"
TOKEN_FIX = ("set MODEL_REPO_TOKEN to an access token (and MODEL_REPO_USER: your user name on Hugging Face or"
             " OpenXLab, oauth2 on ModelScope) in the environment, e.g. `export MODEL_REPO_TOKEN=…`, then check again;"
             " on the platform add it as a secret environment variable")
PLAIN_BLOB_LIMIT = 10 * 1024 * 1024  # hubs want anything larger in LFS

# Model types transformers runs without the repo's code (stdlib list: transformers is not imported here).
# internlm2 is here because the app's native loader runs it as a Llama model.
KNOWN_MODEL_TYPES = frozenset((
    "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3", "gemma3_text", "phi", "phi3", "phimoe", "gpt2", "gpt_neox", "gpt_neox_japanese", "gptj", "gpt_neo",
    "gpt_bigcode", "gpt_oss", "falcon", "falcon_mamba", "bloom", "opt", "mpt", "starcoder2", "stablelm", "olmo",
    "olmo2", "olmo3", "olmoe", "cohere", "cohere2", "granite", "granitemoe", "granitemoeshared", "deepseek_v2",
    "deepseek_v3", "glm", "glm4", "glm4_moe", "helium", "nemotron", "persimmon", "recurrent_gemma", "jamba", "mamba",
    "mamba2", "dbrx", "codegen", "xglm", "biogpt", "ctrl", "exaone4", "hunyuan_v1_dense", "hunyuan_v1_moe",
    "ernie4_5", "ernie4_5_moe", "smollm3", "arcee", "apertus", "seed_oss", "bitnet", "zamba", "zamba2", "diffllama",
    "minimax", "internlm2",
))
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "int8": 1}
GIB = 1024 ** 3
DEFAULT_CONTEXT = 4096  # tokens of KV cache reserved: a long chat at the app's defaults
ACTIVATIONS = 0.5 * GIB
# Memory a model may use on each card: nominal size less the CUDA context and the allocator's slack.
CARDS = {"a10-24gb": ("an NVIDIA A10 (24 GB)", 22.0 * GIB), "a100-40gb": ("an NVIDIA A100 (40 GB)", 39.0 * GIB)}
TIGHT = 0.9


@dataclass
class Check:
    title: str
    status: str
    detail: str
    fix: str = ""

    def line(self, symbols: Mapping[str, str]) -> str:
        text = f"{symbols[self.status]} {self.title}: {self.detail}"
        if self.fix and self.status in (WARN, FAIL):
            text += f" — {self.fix}"
        return text


@dataclass
class Report:
    repo: str
    revision: str
    hardware: str
    checks: List[Check] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    unreachable: bool = False  # the host could not be reached: nothing was really checked
    needs_token: bool = False
    heading: str = ""  # replaces the first line (the engine server check has no revision or hardware)
    config: Optional[dict] = None  # the repo's config.json, when it could be read (an adapter's base needs it)
    base_repo: str = ""  # the base model, when the repo holds a LoRA adapter
    base_revision: str = "main"

    @property
    def failed(self) -> List[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def warnings(self) -> List[Check]:
        return [c for c in self.checks if c.status == WARN]

    @property
    def ok(self) -> bool:
        return not self.failed

    def render(self, symbols: Optional[Mapping[str, str]] = None) -> str:
        symbols = symbols or output_symbols()
        head = self.heading or f"Model repo check: {self.repo} (revision {self.revision}, hardware {self.hardware})"
        return "\n".join([head, *self.notes, *("  " + c.line(symbols) for c in self.checks)])


def output_symbols(stream: object = None) -> Mapping[str, str]:
    """✓ ⚠ ✗ where the console can print them, plain words where it cannot (old Windows code pages)."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    try:
        "".join(SYMBOLS.values()).encode(encoding)
    except (LookupError, UnicodeEncodeError):
        return ASCII_SYMBOLS
    return SYMBOLS


def check_timeout(env: Optional[Mapping[str, str]] = None) -> float:
    """The overall bound in seconds: MODEL_CHECK_TIMEOUT if set, never more than MAX_TIMEOUT."""
    raw = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return min(max(value, 1.0), MAX_TIMEOUT) if value == value else DEFAULT_TIMEOUT


def human_bytes(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:.0f} bytes"


def human_params(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, cap: float = MAX_TIMEOUT) -> float:
        return max(0.5, min(cap, self.end - time.monotonic()))


# ---------------------------------------------------------------- listing


@dataclass
class Listing:
    """The repo's files without their LFS content: path -> size (promised by the pointer, or real)."""

    root: Path
    sizes: Dict[str, int]
    lfs: Set[str]
    commit: str = ""
    local_folder: bool = False

    def has(self, name: str) -> bool:
        return name in self.sizes

    def read_json(self, name: str) -> Tuple[Optional[dict], str]:
        """(data, "") or (None, why it cannot be read)."""
        if name not in self.sizes:
            return None, f"{name} is missing"
        if name in self.lfs:
            return None, f"{name} is stored in LFS (it cannot be read without downloading)"
        try:
            data = json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return None, f"{name} is not valid JSON ({error})"
        if not isinstance(data, dict):
            return None, f"{name} does not hold a JSON object"
        return data, ""


def _scan(root: Path) -> Tuple[Dict[str, int], Set[str]]:
    sizes, lfs = {}, set()
    for relative in working_files(root):
        path = root / relative
        promised = read_pointer(path)
        name = relative.as_posix()
        if promised is not None:
            sizes[name] = promised
            lfs.add(name)
        else:
            try:
                sizes[name] = path.stat().st_size
            except OSError:
                continue
    return sizes, lfs


_HEX = re.compile(r"^[0-9a-fA-F]{7,40}$")


def list_remote(url: str, revision: str, work: Path, env: Dict[str, str], deadline: Deadline,
                secrets: Sequence[str] = ()) -> Listing:
    """Shallow, smudge-skipped checkout of one revision into work (LFS files stay pointers)."""
    revision = revision or "HEAD"
    run_git(["init", "-q", str(work)], "git init", env, timeout=deadline.left(20))
    run_git(["remote", "add", "origin", url], "git remote add", env, cwd=work, timeout=deadline.left(20))
    fetch = ["fetch", "-q", "--no-tags", "--depth", "1", "origin", revision]
    try:
        run_git(fetch, "git fetch", env, cwd=work, timeout=deadline.left(), secrets=secrets)
        target = "FETCH_HEAD"
    except RepoError as error:
        if error.kind != "revision" or not _HEX.match(revision):
            raise
        # Servers that refuse a commit by hash: fetch the history (still no LFS content) and look it up.
        run_git(["fetch", "-q", "--no-tags", "origin"], "git fetch", env, cwd=work, timeout=deadline.left(),
                secrets=secrets)
        try:
            target = run_git(["rev-parse", "--verify", "-q", revision + "^" + "{commit}"], "git rev-parse", env,
                             cwd=work, timeout=deadline.left(20)).strip()
        except RepoError:
            raise RepoError(f"git fetch: revision not found ({revision})",
                            "check MODEL_REVISION: a branch, tag or commit of the model repo", "revision") from None
    run_git(["checkout", "-q", target], "git checkout", env, cwd=work, timeout=deadline.left(30))
    commit = run_git(["rev-parse", "HEAD"], "git rev-parse", env, cwd=work, timeout=deadline.left(20)).strip()
    sizes, lfs = _scan(work)
    return Listing(work, sizes, lfs, commit)


# ---------------------------------------------------------------- the checks


def _reach_failure(error: RepoError, token: str, repo: str) -> Tuple[Check, bool, bool]:
    """(check line, unreachable, needs token) for a listing that failed."""
    title = "1 reachable, revision exists"
    if error.kind == "network":
        return Check(title, WARN, f"not checked: {error.what}", LATER), True, False
    if error.kind == "auth" and not token:
        return Check(title, WARN, "the repo needs a login and MODEL_REPO_TOKEN is not set", TOKEN_FIX), False, True
    if error.kind == "auth":
        return Check(title, FAIL, "the repo refused MODEL_REPO_TOKEN (or MODEL_REPO_USER)",
                     "check the token is valid and can read this repo, and MODEL_REPO_USER"), False, False
    if error.kind == "missing-tool":
        return Check(title, WARN, f"not checked: {error.what}", error.fix), False, False
    if error.kind == "revision":
        return Check(title, FAIL, error.what, "answer model_revision with a branch, tag or commit that exists"
                     " (or set MODEL_REVISION)"), False, False
    return Check(title, FAIL, error.what, f"check model_repo ({repo}): {error.fix}"), False, False


def _auto_map_files(auto_map: object) -> Tuple[Set[str], Set[str]]:
    """(module files named, other repos named) by an auto_map: {"AutoModel": "modeling_x.Cls" | [..]}."""
    files, repos = set(), set()
    if not isinstance(auto_map, dict):
        return files, repos
    for value in auto_map.values():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(reference, str) or "." not in reference:
                continue
            if "--" in reference:
                repo, reference = reference.split("--", 1)
                repos.add(repo)
                continue
            files.add(reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return files, repos


def _check_config(listing: Listing, loader: str) -> Tuple[Check, Optional[dict]]:
    title = "2 config.json and model type"
    config, problem = listing.read_json("config.json")
    if config is None:
        return Check(title, FAIL, problem, "point model_repo at a complete transformers model (config.json at the"
                     " top of the repo)"), None
    model_type = str(config.get("model_type") or "")
    if not model_type:
        return Check(title, FAIL, "config.json has no model_type", "use a transformers model repo"), config
    code, other_repos = _auto_map_files(config.get("auto_map"))
    missing = sorted(f for f in code if not listing.has(f))
    known = model_type in KNOWN_MODEL_TYPES
    arch = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    notes = f"model_type {model_type}" + (f", {', '.join(arch)}" if arch else "")
    missing_fix = f"add {', '.join(missing)} to the repo (auto_map in config.json names them)"
    if loader == "remote-code" and config.get("auto_map"):
        if missing:
            return Check(title, FAIL, f"{notes}; the repo's code is missing: {', '.join(missing)}", missing_fix), config
        extra = f"; auto_map also uses code from {', '.join(sorted(other_repos))}" if other_repos else ""
        check = Check(title, WARN if other_repos else OK, f"{notes}; runs with the repo's own code{extra}",
                      "make sure that repo can be reached too")
    elif known:
        check = Check(title, OK, f"{notes}; transformers runs it without the repo's code")
        if missing:
            check = Check(title, WARN, f"{notes}; auto_map names files that are not in the repo: {', '.join(missing)}",
                          "only loader=remote-code uses them; " + missing_fix)
    elif config.get("auto_map") and not missing:
        return Check(title, FAIL, f"{notes}: transformers does not know this model type; it needs the repo's code",
                     "answer loader=remote-code (or set LOADER=remote-code)"), config
    elif config.get("auto_map"):
        return Check(title, FAIL, f"{notes}: unknown model type and its code is missing: {', '.join(missing)}",
                     missing_fix), config
    else:
        return Check(title, FAIL, f"{notes}: transformers does not know this model type and the repo has no code"
                     " for it (no auto_map)", "use a model transformers supports (Llama, Qwen2, InternLM2, …)"), config
    if check.status == OK and arch and not any(a.endswith(CAUSAL_SUFFIXES) for a in arch):
        check = Check(title, WARN, f"{notes}: not a causal language model", "use a chat (causal LM) model")
    return check, config


def _check_tokenizer(listing: Listing, loader: str) -> Tuple[Check, Optional[dict]]:
    title = "3 tokenizer"
    present = [n for n in ("tokenizer.model", "tokenizer.json") if listing.has(n)]
    if not present and listing.has("vocab.json") and listing.has("merges.txt"):
        present = ["vocab.json", "merges.txt"]
    present += [n for n in listing.sizes if n.endswith(".tiktoken") and "/" not in n]
    tok_config, problem = listing.read_json("tokenizer_config.json")
    if not present:
        fix = "upload the tokenizer files with the model (save_pretrained of the tokenizer writes them)"
        return Check(title, FAIL, "no tokenizer.model or tokenizer.json", fix), tok_config
    if tok_config is None:
        return Check(title, WARN, f"{', '.join(present)}, but {problem}",
                     "upload tokenizer_config.json (it holds the special tokens and the chat template)"), None
    code, _ = _auto_map_files(tok_config.get("auto_map"))
    missing = sorted(f for f in code if not listing.has(f))
    if missing and loader == "remote-code":
        return Check(title, FAIL, f"tokenizer_config.json's auto_map names missing files: {', '.join(missing)}",
                     f"add {', '.join(missing)} to the repo"), tok_config
    return Check(title, OK, f"{', '.join(present)} and tokenizer_config.json"), tok_config


def _check_chat_template(listing: Listing, tok_config: Optional[dict], config: Optional[dict]) -> Check:
    title = "4 chat template"
    if tok_config and tok_config.get("chat_template"):
        return Check(title, OK, "in tokenizer_config.json")
    for name in ("chat_template.jinja", "chat_template.json"):
        if listing.has(name):
            return Check(title, OK, f"in {name}")
    if config and config.get("model_type") == "internlm2":
        return Check(title, OK, "none in the repo; the app knows InternLM2's chat format")
    return Check(title, WARN, "none found; the app will format chats the InternLM2 way, which this model may not know",
                 "use a chat (instruct) model, or add chat_template to tokenizer_config.json")


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin")


def _weight_files(listing: Listing) -> Tuple[List[str], Optional[Check]]:
    """The files the loader would read, or a ✗ check that says why there are none."""
    title = "5 weights"
    top = [n for n in listing.sizes if "/" not in n]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name not in listing.sizes:
            continue
        index, problem = listing.read_json(index_name)
        if index is None:
            return [], Check(title, FAIL, problem, "upload a valid index with the shards")
        weight_map = index.get("weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards:
            return [], Check(title, FAIL, f"{index_name} names no shards", "upload a valid index with the shards")
        missing = [s for s in shards if not listing.has(s)]
        if missing:
            return [], Check(title, FAIL, f"{index_name} names {len(missing)} shard(s) that are not in the repo:"
                             f" {', '.join(missing[:3])}", "upload every shard the index lists")
        total = (index.get("metadata") or {}).get("total_size")
        stored = sum(listing.sizes[s] for s in shards)
        if isinstance(total, (int, float)) and total > stored:
            return [], Check(title, FAIL, f"{index_name} promises {total:,} bytes of tensors but the shards hold"
                             f" {stored:,}", "upload the shards again (one is truncated or stale)")
        return shards, None
    safetensors = sorted(n for n in top if n.endswith(".safetensors"))
    bins = sorted(n for n in top if n.endswith(".bin") and n not in _NOT_WEIGHTS and not n.startswith("optimizer"))
    files = safetensors or bins
    if not files:
        adapter = listing.has("adapter_config.json")
        fix = ("this is a LoRA adapter without its weights: upload adapter_model.safetensors (or .bin)"
               if adapter else "push the weights (*.safetensors) with git lfs")
        return [], Check(title, FAIL, "no weights (*.safetensors or *.bin)", fix)
    if any(_SHARD.search(n) for n in files):
        kind = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        return [], Check(title, FAIL, f"sharded weights without {kind}", f"upload {kind} with the shards")
    return files, None


def _check_weights(listing: Listing) -> Tuple[Check, List[str]]:
    files, failure = _weight_files(listing)
    if failure:
        return failure, []
    total = sum(listing.sizes[f] for f in files)
    what = files[0] if len(files) == 1 else f"{len(files)} shards"
    return Check("5 weights", OK, f"{what}, {human_bytes(total)}"), files


@dataclass(frozen=True)
class Remote:
    """How to reach the repo's LFS store: the git URL and the same credentials the clone sends."""

    url: str
    token: str = field(default="", repr=False)
    user: str = ""


def _missing_objects(listing: Listing, remote: Remote, deadline: Deadline) -> Tuple[Optional[Check], str]:
    """(a ✗ naming the files whose LFS objects the store lacks or a ⚠ when it could not say, else None;
    what was asked, for the ✓ line)."""
    title = "6 weights in LFS"
    names = sorted(listing.lfs)
    try:
        objects, missing = check_objects(remote.url, listing.root, names, remote.token, remote.user,
                                         timeout=deadline.left(cap=20))
    except LFSUnanswered as error:
        if error.kind == "protocol":
            return None, "objects not asked: an ssh remote"
        fix = TOKEN_FIX if error.kind == "auth" and not remote.token else LATER
        return Check(title, WARN, f"{len(names)} file(s) in LFS, but whether their content was uploaded is not"
                     f" known: {error}", fix), ""
    if not missing:
        where = "the LFS server" if remote.url.startswith(("http://", "https://")) else "the remote's LFS store"
        return None, f"all {len(objects)} object(s) present on {where}"
    shown = ", ".join(item.path for item in missing[:4]) + (" …" if len(missing) > 4 else "")
    return Check(title, FAIL, f"{len(missing)} of {len(objects)} LFS object(s) are not on the server, only their"
                 f" pointers: {shown}",
                 "the pointers were pushed without the files (git-lfs missing or the upload interrupted): from the"
                 " machine that has the files, run `git lfs push --all origin`, then check again"), ""


def _check_lfs(listing: Listing, weights: List[str], remote: Optional[Remote] = None,
               deadline: Optional[Deadline] = None) -> Check:
    title = "6 weights in LFS"
    if listing.local_folder:
        pointers = sorted(listing.lfs)
        if pointers:
            return Check(title, FAIL, f"{', '.join(pointers[:3])} are LFS pointer files, not the real files",
                         "run `git lfs pull` in that folder")
        return Check(title, OK, "local folder: the files are used as they are")
    plain = [w for w in weights if w not in listing.lfs]
    plain += [n for n, size in listing.sizes.items() if n not in listing.lfs and size > PLAIN_BLOB_LIMIT
              and n not in plain]
    fix = ("track them with git lfs (`git lfs track \"*.safetensors\"`, or `git lfs migrate import"
           " --include=\"*.safetensors,*.bin\"` for committed history) and push again")
    absent, asked = None, ""
    if remote is not None and listing.lfs:
        absent, asked = _missing_objects(listing, remote, deadline or Deadline(MAX_TIMEOUT))
    if absent is not None and absent.status == FAIL:
        return absent
    if plain:
        return Check(title, WARN, f"committed as plain git blobs, not LFS: {', '.join(sorted(plain)[:4])}", fix)
    if absent is not None:
        return absent
    if not weights:
        return Check(title, SKIP, "not checked (no weights)")
    stored = sum(listing.sizes[w] for w in weights)
    asked = f"; {asked}" if asked else ""
    return Check(title, OK, f"{len(weights)} file(s) in LFS ({human_bytes(stored)}, not downloaded){asked}")


def machine_memory() -> Optional[int]:
    """This machine's RAM in bytes, where the OS tells the standard library."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def estimate_memory(weight_bytes: int, config: dict, runtime_bytes: float,
                    kv_bytes: Optional[int] = None) -> Tuple[float, float, str]:
    """(params, bytes needed at runtime, note) from stored weight bytes and the config.

    runtime_bytes per weight (1 for int8), kv_bytes per cached key/value element (default: the same)."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", "")
    quantized = bool(config.get("quantization_config"))
    stored = DTYPE_BYTES.get(dtype)
    note = ""
    if quantized:
        params, weights = 0.0, float(weight_bytes)
        note = "quantized: counted as stored"
    elif stored:
        params = weight_bytes / stored
        weights = params * runtime_bytes
    else:
        params, weights = weight_bytes / 2, float(weight_bytes)
        note = "config.json names no dtype: counted as stored"
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config.get("hidden_size") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    context = min(int(config.get("max_position_embeddings") or DEFAULT_CONTEXT), DEFAULT_CONTEXT)
    kv = 2 * layers * kv_heads * head_dim * context * (kv_bytes or runtime_bytes)
    if not kv:
        kv = 0.05 * weights
    return params, weights + kv + ACTIVATIONS, note


def _cpu_fit(need32: float, need16: float, memory: int) -> str:
    """fits (float32 too), bf16 (only where the CPU runs bfloat16) or small."""
    if need16 > memory:
        return "small"
    return "bf16" if need32 > memory else "fits"


def _check_cpu_fit(title: str, need32: float, need16: float, weight_bytes: int, config: dict, head: str,
                   platforms: str, need8: Optional[float] = None) -> List[Check]:
    """Judged on the CPU tiers of the platforms answered; this computer's RAM is a second, informative line."""
    if need8 is not None:  # int8 weights: the app needs need8 whatever the CPU's bf16 support
        need32 = need16 = need8
    _, need_gpu, _ = estimate_memory(weight_bytes, config, 2)
    card = next((name for name, (_, usable) in CARDS.items() if need_gpu <= usable), "")
    smaller = "use a smaller model (about 1.8B parameters suits a CPU)" + (f" or a GPU (hardware {card})" if card
                                                                             else "")
    ram = machine_memory()
    here = "" if ram is None else f"this computer has {ram / GIB:.1f} GiB"
    hosted = chosen_platforms(platforms)
    if not hosted:  # local only: this machine is where it runs
        if ram is None:
            return [Check(title, OK, head + "; this machine's memory is unknown")]
        verdict = _cpu_fit(need32, need16, ram)
        if verdict == "small":
            return [Check(title, WARN, f"{head}; {here}", smaller)]
        if verdict == "bf16":
            return [Check(title, WARN, f"{head}; {here} (enough only where the CPU runs bfloat16)",
                          "use a smaller model or a machine with more memory")]
        return [Check(title, OK, f"{head}; {here}")]
    parts, worst, unknown = [], "fits", []
    for platform in hosted:
        tiers = [tier for tier in cpu_tiers(platform) if tier.memory]
        if not tiers:
            unknown.append(NAMES[platform])
            continue
        fitting = [tier for tier in tiers if _cpu_fit(need32, need16, tier.memory or 0) == "fits"]
        squeezed = [tier for tier in tiers if _cpu_fit(need32, need16, tier.memory or 0) == "bf16"]
        best = (fitting or squeezed or [None])[0]
        if best is None:
            parts.append(f"{NAMES[platform]}: no CPU tier is large enough (the largest has"
                         f" {max(t.memory or 0 for t in tiers) / GB:.0f} GB)")
            worst = "small"
            continue
        cost = "free" if best.free else "paid"
        note = "" if best in fitting else ", only if its CPU runs bfloat16"
        parts.append(f"{NAMES[platform]} {best.name} ({best.memory / GB:.0f} GB, {cost}){note}")
        if worst != "small" and (best not in fitting or not best.free):
            worst = "tight"
    detail = f"{head}; fits " + "; ".join(parts) if parts else head
    if unknown:
        verb = "documents" if len(unknown) == 1 else "document"
        detail += f"; {' and '.join(unknown)} {verb} no CPU tier memory, so not judged there"
    checks = []
    if worst == "small":
        checks.append(Check(title, WARN, detail, smaller))
    elif worst == "tight":
        checks.append(Check(title, WARN, detail, "choose that tier when deploying, or use a smaller model"))
    else:
        checks.append(Check(title, OK, detail))
    if ram is not None:
        verdict = {"fits": "fits", "bf16": "fits only where the CPU runs bfloat16", "small": "too small"}[
            _cpu_fit(need32, need16, ram)]
        checks.append(Check(f"{title} on this computer", INFO, f"{here}: {verdict} for `python app.py`"))
    return checks


def _check_fit(listing: Listing, weights: List[str], config: Optional[dict], hardware: str, dtype: str,
               platforms: str = "local", quantize: str = "auto") -> List[Check]:
    title = f"7 fits {hardware}"
    if not weights or config is None:
        return [Check(title, SKIP, "not checked (no weights or no config.json)")]
    weight_bytes = sum(listing.sizes[w] for w in weights)
    gpu_bytes = 4 if dtype == "float32" else 2
    params, need, note = estimate_memory(weight_bytes, config, gpu_bytes)
    size = f"{human_params(params)} parameters, " if params else ""
    unsure = " (" + note + ")" if note else ""
    if hardware == "cpu":
        _, need32, _ = estimate_memory(weight_bytes, config, 4)
        _, need16, _ = estimate_memory(weight_bytes, config, 2)
        head = f"{size}needs about {need32 / GIB:.1f} GiB in float32 or {need16 / GIB:.1f} GiB in bfloat16{unsure}"
        need8 = None
        if not note and (quantize == "int8" or (quantize == "auto" and dtype == "auto")):
            _, need8, _ = estimate_memory(weight_bytes, config, 1, kv_bytes=2)
            head = (f"{size}needs about {need8 / GIB:.1f} GiB with int8 weights (QUANTIZE={quantize}; "
                    f"{need16 / GIB:.1f} GiB in bfloat16, {need32 / GIB:.1f} GiB in float32){unsure}")
        return _check_cpu_fit(title, need32, need16, weight_bytes, config, head, platforms, need8)
    fits = [name for name, (_, usable) in CARDS.items() if need <= usable]
    detail = f"{size}needs about {need / GIB:.1f} GiB on the GPU{unsure}"
    if hardware not in CARDS:  # auto: the card is chosen when deploying
        if fits:
            return [Check(title, OK, f"{detail}: fits {' and '.join(fits)}")]
        return [Check(title, WARN, f"{detail}: too large for an A10 (24 GB) or an A100 (40 GB)",
                      "use a smaller or quantized model")]
    label, usable = CARDS[hardware]
    detail += f", {label} has about {usable / GIB:.0f} GiB usable"
    if need > usable:
        bigger = [name for name in fits if CARDS[name][1] > usable]
        fix = (f"answer hardware {bigger[0]}, or use a smaller model" if bigger
               else "use a smaller or quantized model (a 7B model fits an A10, a 20B one an A100 40 GB)")
        return [Check(title, WARN if note else FAIL, detail, fix)]
    if need > TIGHT * usable:
        return [Check(title, WARN, detail + ": tight, long chats may run out of memory",
                      "lower MAX_NEW_TOKENS, or use a larger card or a smaller model")]
    return [Check(title, OK, detail)]


def _check_modelscope(listing: Listing) -> Check:
    title = "8 ModelScope configuration.json"
    if listing.has("configuration.json"):
        return Check(title, OK, "present")
    return Check(title, WARN, "missing; ModelScope's pages and SDK expect it",
                 'add configuration.json with {"framework": "pytorch", "task": "text-generation"}')


# ---------------------------------------------------------------- entry points


def _local_path(repo: str) -> Optional[Path]:
    if repo.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return Path(unquote(urlsplit(repo).path))
    if "://" in repo:
        return None
    return Path(repo).expanduser()


def check_repo(repo: str, revision: str = "main", hardware: str = "auto", loader: str = "native",
               dtype: str = "auto", token: str = "", user: str = "", timeout: Optional[float] = None,
               hub: Optional[str] = None, platforms: str = "local", quantize: str = "auto",
               engine: str = "transformers", base_repo: str = "", base_revision: str = "main") -> Report:
    """Run every check; never raises for a problem of the repo or the network.

    ``platforms`` is where the app will run: the answer's hosted platforms have the fit judged on their
    CPU tiers; "local" (the app's own pre-flight, on the machine it runs on) judges this machine.
    """
    deadline = Deadline(check_timeout() if timeout is None else min(timeout, MAX_TIMEOUT))
    report = Report(repo, revision or "main", hardware)
    report.base_repo, report.base_revision = base_repo, base_revision or "main"
    if "://" not in repo and repo.strip() and Path(repo.strip()).expanduser().exists():
        repo = str(Path(repo.strip()).expanduser().resolve())  # a relative folder (MODEL_PATH=./merged)
    try:
        parsed = normalise(repo)
    except RepoURLError as error:
        report.checks.append(Check("1 reachable, revision exists", FAIL, error.what, error.fix))
        return _skip_rest(report)
    if parsed.changed:
        report.notes.append("  " + parsed.describe())
        if parsed.revision and revision in ("", "main"):
            report.revision = revision = parsed.revision
    hub = hub or parsed.hub
    title = "1 reachable, revision exists"
    local = _local_path(parsed.git_url) if parsed.hub == LOCAL else None
    if local is not None and not local.exists():
        report.checks.append(Check(title, FAIL, f"the folder {local} does not exist",
                                   "check model_repo: the folder must exist on the machine that runs the app"))
        return _skip_rest(report)
    work_parent = Path(tempfile.mkdtemp(prefix="model-check-"))
    try:
        try:
            source = resolve_source(parsed.git_url, revision or "main")
            remote = None
            if source.local_folder is not None:
                sizes, lfs = _scan(source.local_folder)
                listing = Listing(source.local_folder, sizes, lfs, local_folder=True)
                report.checks.append(Check(title, OK, f"local folder {source.local_folder}, used as it is"))
            else:
                env = git_env(token, user)
                env["GIT_HTTP_LOW_SPEED_TIME"] = str(max(1, min(30, int(deadline.seconds))))
                listing = list_remote(source.url, source.revision, work_parent / "repo", env, deadline, (token,))
                remote = Remote(source.url, token, user)
                report.checks.append(Check(title, OK, f"revision {source.revision} is commit {listing.commit[:12]}"))
        except RepoError as error:
            check, report.unreachable, report.needs_token = _reach_failure(error, token, repo)
            report.checks.append(check)
            return _skip_rest(report)
        _run_checks(report, listing, hub, hardware, loader, dtype, remote, deadline, platforms, quantize, engine)
    finally:
        shutil.rmtree(work_parent, ignore_errors=True)
    return report


GPU_ENGINES = {"lmdeploy": "LMDeploy", "vllm": "vLLM"}


def quantization(listing: Listing, config: Optional[dict]) -> str:
    """What 4-bit format the repo holds, in words ("4-bit AWQ", "an LMDeploy TurboMind export"), or ""."""
    if any(name.startswith(("triton_models/", "turbomind/")) for name in listing.sizes):
        return "an LMDeploy TurboMind export"
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return ""
    method = str(quant.get("quant_method") or quant.get("quant_type") or "quantized").upper()
    bits = quant.get("w_bit", quant.get("bits"))
    return f"a {bits}-bit {method} model" if bits else f"a {method} model"


def _check_engine(listing: Listing, config: Optional[dict], engine: str, hardware: str) -> Optional[Check]:
    """The engine can run this repo on this hardware: GPU servers need a GPU, 4-bit repos need a GPU server."""
    title = f"9 engine {engine}"
    quantized = quantization(listing, config)
    if engine in GPU_ENGINES and hardware == "cpu":
        return Check(title, FAIL, f"{GPU_ENGINES[engine]} runs only on Linux x86_64 with an NVIDIA GPU (CUDA), and"
                     " hardware is cpu", "answer hardware a10-24gb or a100-40gb, or engine=transformers for the CPU"
                     " (int8 weights)")
    if quantized and engine == "transformers":
        return Check(title, FAIL, f"{quantized}: transformers does not run it here",
                     "answer engine=lmdeploy (or vllm) on a GPU")
    if engine in GPU_ENGINES:
        what = f"{quantized} for {GPU_ENGINES[engine]}" if quantized else GPU_ENGINES[engine]
        return Check(title, OK, f"{what}; needs Linux x86_64 with an NVIDIA GPU (CUDA)")
    return None


def _run_checks(report: Report, listing: Listing, hub: str, hardware: str, loader: str, dtype: str,
                remote: Optional[Remote], deadline: Deadline, platforms: str, quantize: str,
                engine: str = "transformers") -> None:
    if is_adapter(list(listing.sizes)):
        _run_adapter_checks(report, listing, remote, deadline, dict(
            hardware=hardware, loader=loader, dtype=dtype, platforms=platforms, quantize=quantize, engine=engine))
        return
    config_check, config = _check_config(listing, loader)
    report.config = config
    tokenizer_check, tok_config = _check_tokenizer(listing, loader)
    weights_check, weights = _check_weights(listing)
    report.checks += [
        config_check,
        tokenizer_check,
        _check_chat_template(listing, tok_config, config),
        weights_check,
        _check_lfs(listing, weights, remote, deadline),
        *_check_fit(listing, weights, config, hardware, dtype, platforms, quantize),
    ]
    if hub == MODELSCOPE:
        report.checks.append(_check_modelscope(listing))
    engine_check = _check_engine(listing, config, engine, hardware)
    if engine_check is not None:
        report.checks.append(engine_check)


def _run_adapter_checks(report: Report, listing: Listing, remote: Optional[Remote], deadline: Deadline,
                        options: dict) -> None:
    """A LoRA adapter repo: the adapter itself, then the base model it needs, checked as usual."""
    def check_base(repo: str, revision: str) -> Report:
        shared = remote is not None and same_host(repo, remote.url)  # the token is for the adapter's host only
        return check_repo(repo, revision, token=remote.token if shared else "", user=remote.user if shared else "",
                          timeout=max(1.0, deadline.end - time.monotonic()), **options)

    if options["engine"] not in ("transformers",):
        report.checks.append(Check(f"9 engine {options['engine']}", FAIL, "a LoRA adapter: the engine servers"
                                   " serve whole models only", "answer engine=transformers (it merges the adapter"
                                   " at load), or deploy the merged model (xtuner convert merge)"))

    report.checks += check_adapter_repo(listing, remote.url if remote else str(listing.root), report.base_repo,
                                        report.base_revision, check_base, Check,
                                        {"ok": OK, "warn": WARN, "fail": FAIL, "info": INFO})
    adapter_files = [name for name in listing.lfs if name.startswith("adapter_model")]
    lfs = _check_lfs(listing, adapter_files, remote, deadline)
    lfs.title = "6 adapter in LFS"
    report.checks.append(lfs)


def _skip_rest(report: Report) -> Report:
    for title in ("2 config.json and model type", "3 tokenizer", "4 chat template", "5 weights", "6 weights in LFS",
                  f"7 fits {report.hardware}"):
        report.checks.append(Check(title, SKIP, "not checked"))
    return report


def check_settings(settings: object, timeout: Optional[float] = None) -> Report:
    """The app's pre-flight check, from its Settings (MODEL_PATH wins over MODEL_REPO, as in the app)."""
    model_path = getattr(settings, "model_path", None)
    return check_repo(
        str(model_path) if model_path else getattr(settings, "model_repo", ""),
        getattr(settings, "model_revision", "main"),
        getattr(settings, "hardware", "auto"),
        getattr(settings, "loader", "native"),
        getattr(settings, "dtype", "auto"),
        token=getattr(settings, "repo_token", ""),
        user=getattr(settings, "repo_user", ""),
        timeout=timeout,
        quantize=getattr(settings, "quantize", "auto"),
        engine="command" if getattr(settings, "engine_command", "") else getattr(settings, "engine", "transformers"),
        base_repo=getattr(settings, "base_model_repo", ""),
        base_revision=getattr(settings, "base_model_revision", "main"),
    )


def check_endpoint_report(url: str, model: str, api_key: str = "", timeout: Optional[float] = None) -> Report:
    """ENGINE=openai: the server answers, accepts the key and serves the model (nothing is downloaded)."""
    from ..engines.openai_api import Endpoint, EndpointError, check_endpoint

    report = Report(url, "-", "-", heading=f"Engine server check: {url} (model {model})")
    titles = ("1 server reachable", "2 API key accepted", "3 model served")
    try:
        endpoint = Endpoint.from_url(url, model, api_key)
        verdict, names = check_endpoint(endpoint, min(check_timeout() if timeout is None else timeout, 20.0))
    except EndpointError as error:
        if error.status in (401, 403):
            report.checks += [Check(titles[0], OK, "answered"), Check(titles[1], FAIL, error.what, error.fix)]
        elif error.status:
            report.checks += [Check(titles[0], FAIL, error.what, error.fix)]
        else:  # unreachable from here: a cluster address may be reachable only where the app runs
            report.unreachable = True
            report.checks += [Check(titles[0], WARN, f"not checked: {error.what}", error.fix)]
        return report
    report.checks += [Check(titles[0], OK, f"{endpoint.base} answered"),
                      Check(titles[1], OK, "accepted" if api_key else "no key needed")]
    if verdict == "unlisted":
        shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        report.checks.append(Check(titles[2], FAIL, f"{model!r} is not among the models it lists ({shown})",
                                   "answer engine_model (or set ENGINE_MODEL) with one of those names"))
    elif verdict == "unknown":
        report.checks.append(Check(titles[2], WARN, "the server lists no models, so the name was not checked",
                                   "make sure ENGINE_MODEL is the name the server expects"))
    else:
        report.checks.append(Check(titles[2], OK, f"{model} is listed"))
    return report


def summary(report: Report) -> str:
    """What to do next, in one line, for the hook and the CLI."""
    if report.failed:
        return f"the model repo check found {len(report.failed)} problem(s) marked {output_symbols()[FAIL]}"
    if report.unreachable:
        return f"the model host could not be reached, so the repo was not checked — {LATER}"
    if report.needs_token:
        return "the model repo needs a login, so it was not checked — " + TOKEN_FIX
    if report.warnings:
        return f"the model repo passed with {len(report.warnings)} warning(s) marked {output_symbols()[WARN]}"
    return "the model repo passed every check"


# ---------------------------------------------------------------- the template's answers (both hooks use this)

SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
BAD_REVISION = re.compile(r"(^[-/.])|[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|//|/$|\.lock$|\.$")
TRUE_WORDS = ("1", "true", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "no", "n", "off")
NUMBER_ANSWERS = (("max_new_tokens", int), ("temperature", float), ("top_p", float), ("repetition_penalty", float))


def suggest_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return slug[:64].strip("-") or "my-chat-app"


def is_yes(flag: object) -> bool:
    return flag if isinstance(flag, bool) else str(flag).strip().lower() in TRUE_WORDS


def check_answers(answers: Mapping[str, object]) -> List[Tuple[str, str]]:
    """Every problem with the template's answers as (what, fix); an empty list means they are good."""
    from ..settings import (
        ENGINE_CHOICES,
        HARDWARE_CHOICES,
        LOADER_CHOICES,
        QUANTIZE_CHOICES,
        SettingsError,
        check_number,
    )

    problems = []
    name = str(answers.get("app_name", ""))
    if not SLUG.match(name) or len(name) > 64:
        problems.append((f"app_name {name!r} is not a slug",
                         f"use lower-case letters, digits and single dashes, at most 64 characters, e.g. "
                         f"{suggest_slug(name)}"))
    for key, kind in NUMBER_ANSWERS:
        try:
            check_number(key.upper(), answers.get(key), kind)
        except SettingsError as error:
            what, _, fix = str(error).partition(" — ")
            problems.append((key + what[len(key):], fix))
    for key, choices in (("hardware", HARDWARE_CHOICES), ("loader", LOADER_CHOICES),
                         ("quantize", QUANTIZE_CHOICES), ("engine", ENGINE_CHOICES)):
        value = answers.get(key)
        if value not in choices:
            problems.append((f"{key} {value!r} is not known", f"answer one of: {', '.join(choices)}"))
    if answers.get("engine") == "openai" and not (str(answers.get("engine_url", "")).strip()
                                                  and str(answers.get("engine_model", "")).strip()):
        problems.append(("engine=openai needs engine_url and engine_model",
                         "answer the server's address (e.g. http://10.0.0.5:23333/v1) and the model name it serves"))
    if answers.get("engine") in GPU_ENGINES and answers.get("hardware") == "cpu":
        problems.append((f"engine={answers.get('engine')} needs an NVIDIA GPU but hardware is cpu",
                         "answer hardware a10-24gb or a100-40gb, or engine=transformers for the CPU"))
    flag = answers.get("validate_model_repo")
    if not isinstance(flag, bool) and str(flag).strip().lower() not in TRUE_WORDS + FALSE_WORDS:
        problems.append((f"validate_model_repo {flag!r} is not yes or no", "answer yes (check the repo now) or no"))
    revision = str(answers.get("model_revision", "")).strip()
    if not revision:
        problems.append(("model_revision is empty", "answer main, or a branch, tag or commit of the model repo"))
    elif BAD_REVISION.search(revision):
        problems.append((f"model_revision {revision!r} is not a branch, tag or commit name",
                         "answer main, or a branch, tag or commit as git shows it (no spaces, no leading '-')"))
    try:
        implied = normalise(str(answers.get("model_repo", ""))).revision
    except RepoURLError as error:
        problems.append((error.what, error.fix))
    else:
        if implied and revision not in ("", "main", implied):
            problems.append((f"model_repo points at revision {implied} but model_revision is {revision}",
                             f"answer model_revision {implied}, or paste the repo address without /tree/{implied}"))
    return problems


def _defaults() -> dict:
    from ..settings import SettingsError, load_defaults

    try:
        return load_defaults()
    except SettingsError:
        return {}


def cli(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    """``python -m xlab_chat check [--repo …] [--revision …] [--hardware …] [--loader …]``; 1 on any ✗."""
    from ..settings import DTYPE_CHOICES, ENGINE_CHOICES, HARDWARE_CHOICES, LOADER_CHOICES, QUANTIZE_CHOICES

    env = os.environ if env is None else env
    argv = list(argv)
    if argv and argv[0] == "check":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"ERROR: unknown command {argv[0]!r} — use `python -m xlab_chat check [--hardware …]`", file=sys.stderr)
        return 2
    defaults = _defaults()

    def pick(name: str, fallback: str) -> str:
        return (env.get(name.upper()) or str(defaults.get(name) or "") or fallback).strip()

    parser = argparse.ArgumentParser(
        prog="python -m xlab_chat check",
        description="Check the model repo without downloading its weights (MODEL_REPO_TOKEN and MODEL_REPO_USER"
                    " are read from the environment).",
    )
    parser.add_argument("--repo", default=env.get("MODEL_PATH") or pick("model_repo", ""),
                        help="git URL, model page or folder (default: MODEL_PATH, MODEL_REPO or settings.json)")
    parser.add_argument("--revision", default=pick("model_revision", "main"), help="branch, tag or commit")
    parser.add_argument("--hardware", default=pick("hardware", "auto").lower(), choices=HARDWARE_CHOICES)
    parser.add_argument("--loader", default=pick("loader", "native").lower(), choices=LOADER_CHOICES)
    parser.add_argument("--dtype", default=(env.get("DTYPE") or "auto").lower(), choices=DTYPE_CHOICES)
    parser.add_argument("--quantize", default=pick("quantize", "auto").lower(), choices=QUANTIZE_CHOICES)
    parser.add_argument("--base-repo", default=pick("base_model_repo", ""),
                        help="the base model, when the repo holds a LoRA adapter (default: BASE_MODEL_REPO)")
    parser.add_argument("--base-revision", default=pick("base_model_revision", "main"))
    parser.add_argument("--engine", default=pick("engine", "transformers").lower(), choices=ENGINE_CHOICES,
                        help="engine=openai checks ENGINE_URL / ENGINE_MODEL (key from ENGINE_API_KEY) instead")
    parser.add_argument("--platforms", default=pick("platforms", "local").lower(),
                        help="where the app will run, as answered (all, local, or names joined by +): the CPU"
                             " fit is judged on those platforms' tiers")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds for the whole check (default {TIMEOUT_ENV} or {DEFAULT_TIMEOUT:.0f}, at most"
                             f" {MAX_TIMEOUT:.0f})")
    args = parser.parse_args(argv)
    if args.engine == "openai":
        report = check_endpoint_report(pick("engine_url", ""), pick("engine_model", ""), env.get("ENGINE_API_KEY", ""),
                                       args.timeout)
        return _finish(report)
    if not args.repo:
        print("ERROR: no model repo to check — pass --repo or set MODEL_REPO", file=sys.stderr)
        return 2
    report = check_repo(args.repo, args.revision, args.hardware, args.loader, args.dtype,
                        token=env.get("MODEL_REPO_TOKEN", ""), user=env.get("MODEL_REPO_USER", ""),
                        timeout=args.timeout, platforms=args.platforms, quantize=args.quantize, engine=args.engine,
                        base_repo=args.base_repo, base_revision=args.base_revision)
    return _finish(report)


def _finish(report: Report) -> int:
    print(report.render(), flush=True)
    line = summary(report)
    if report.failed:
        print(f"ERROR: {line} — fix them and run the check again", file=sys.stderr, flush=True)
        return 1
    print(line, flush=True)
    return 0
