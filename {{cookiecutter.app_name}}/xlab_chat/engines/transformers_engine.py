"""Choose the device and dtype, load the model, and stream replies that stop when told to.

Generation runs in a background thread and never calls the model repo's own
``stream_chat``: its remote code breaks on current transformers and cannot be
cancelled. Our stopping criterion checks a per-request event at every step, so a
Stop or a disconnect frees the slot at once.
"""

from __future__ import annotations

import json
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .hf_compat import dtype_keyword
from .images import MAX_IMAGES, TEXT_ONLY, TOO_MANY, ImageError
from .internlm2 import check_supported, is_internlm2, load_internlm2_as_llama, native_tokenizer, reset_dynamic_rope
from .protocol import InputTooLong, Message

if TYPE_CHECKING:
    from .llava import Vision

IM_END = "<|im_end|>"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GPU_HARDWARE = ("a10-24gb", "a100-40gb")



def with_image_slots(messages: List[Message]) -> List[Message]:
    """Each user turn that brought images opens with one image slot and a newline per image, as XTuner trains
    (``'<image>\\n' + question``); the images themselves leave the message."""
    from .llava import IMAGE_SLOT

    out = []
    for message in messages:
        text = str(message["content"]).replace(IMAGE_SLOT[0], "")  # the slot's private-use marker is ours alone
        out.append({"role": message["role"], "content": (IMAGE_SLOT + "\n") * len(message.get("images") or ()) + text})
    return out


def internlm2_prompt(messages: List[Message], bos: str) -> str:
    """InternLM2's chat format, for repos that ship no chat template."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return f"{bos}{turns}<|im_start|>assistant\n"


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    label: str  # what the page header shows, e.g. "NVIDIA A10 · bfloat16" or "CPU · int8 (fbgemm)"
    int8: bool = False  # Linear weights stored as int8 (the CPU's fast path), the rest in dtype


def cpu_runs_bf16_well() -> bool:
    """bf16 is only fast on CPUs with native bf16 instructions (AVX512-BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_placement(hardware: str, requested_dtype: str = "auto", quantize: str = "none") -> Placement:
    """GPU when there is one (bf16 where supported, else fp16); CPU in int8, bf16 or fp32, never fp16.

    On the CPU, decoding reads every weight once per token, so int8 weights (half of bf16's bytes) are the
    fastest; QUANTIZE=auto uses them there unless a DTYPE was asked for, QUANTIZE=int8 always. The rest of the model
    (and the activations the int8 kernels get) stays in the dtype this CPU runs best; the label gains the kernels'
    names once they are chosen (``Engine.load``).
    """
    use_cuda = torch.cuda.is_available() and hardware != "cpu"
    if hardware in GPU_HARDWARE and not use_cuda:
        print(f"[engine] HARDWARE={hardware} but no CUDA GPU is visible; falling back to the CPU", flush=True)
    if requested_dtype != "auto":
        dtype = DTYPES[requested_dtype]
        if dtype is torch.float16 and not use_cuda:
            raise ValueError("DTYPE=float16 does not run on the CPU — use DTYPE=auto, bfloat16 or float32")
    elif use_cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if cpu_runs_bf16_well() else torch.float32
    name = torch.cuda.get_device_name(0) if use_cuda else "CPU"
    wants_int8 = quantize == "int8" or (quantize == "auto" and requested_dtype == "auto")
    if wants_int8 and use_cuda:
        if quantize == "int8":
            print("[engine] QUANTIZE=int8 is the CPU's fast path; on the GPU the model runs in "
                  f"{str(dtype).replace('torch.', '')}", flush=True)
    elif wants_int8:
        from . import int8

        if int8.supported():
            return Placement("cpu", dtype, "CPU · int8", int8=True)
        print(f"[engine] int8 does not run with this torch {torch.__version__} on this CPU; using "
              f"{str(dtype).replace('torch.', '')}", flush=True)
    return Placement("cuda" if use_cuda else "cpu", dtype, f"{name} · {str(dtype).replace('torch.', '')}")


def load_model(path: Path, placement: Placement, loader: str, adapter_path: Optional[Path] = None
               ) -> Tuple[object, object]:
    """Model and tokenizer; InternLM2 runs natively as Llama unless remote code was chosen. A LoRA adapter folder
    is merged into the weights in memory (checked against the base's shapes first, so a mismatch fails fast)."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    remote = loader == "remote-code"
    adapter = None
    if adapter_path is not None:
        from .lora import load_adapter

        adapter = load_adapter(adapter_path, config if is_internlm2(config) else None)
    if not remote:
        check_supported(config)
        if is_internlm2(config):
            model = load_internlm2_as_llama(path, placement.dtype, placement.device, quantize_int8=placement.int8,
                                            adapter=adapter)
            return model, native_tokenizer(path)
    kwargs: Dict[str, object] = {dtype_keyword(): placement.dtype, "trust_remote_code": remote}
    if placement.device == "cuda":
        kwargs["device_map"] = "cuda"  # weights go straight to the GPU, no CPU copy
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=remote)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if adapter is not None:
        from .lora import merge_into_model

        merge_into_model(model, adapter)
    if placement.int8:  # after loading (one float copy at the peak); the InternLM2 path quantises per shard
        from . import int8

        int8.quantize_model_(model, skip=int8.KEEP_FLOAT)
    return model.eval(), tokenizer


def vision_dtype(placement: Placement) -> torch.dtype:
    """The CLIP tower's dtype: the placement's on a GPU; on the CPU bf16 only where it is fast, else fp32
    (int8 is the LLM's: the tower is compute bound over 577 positions, where int8 kernels gain little)."""
    if placement.device == "cuda":
        return placement.dtype
    if placement.int8:
        return torch.bfloat16 if cpu_runs_bf16_well() else torch.float32
    return placement.dtype


class _Cancelled(StoppingCriteria):
    """Stops generate() at the next step once the request's event is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class IncrementalDecoder:
    """Turns new token ids into new text without re-decoding the whole reply.

    Decoding a short window that overlaps the previous token keeps sentencepiece's
    leading spaces, and holding back a trailing U+FFFD keeps multi-byte characters
    (Chinese, emoji) whole when they span several tokens.
    """

    def __init__(self, tokenizer: object, skip_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = set(skip_ids)
        self.ids: List[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(i for i in token_ids if i not in self.skip_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class _TextSink(BaseStreamer):
    """The streamer generate() feeds: skips the prompt, hands each new piece of text on."""

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[object], None]) -> None:
        self.decoder = decoder
        self.emit = emit
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        text = self.decoder.push(value.reshape(-1).tolist())
        if text:
            self.emit(text)

    def end(self) -> None:
        return None


class Generation:
    """One reply generating on a worker thread; ``cancel()`` stops it at the next token."""

    DONE = object()

    def __init__(self, dropped_turns: int) -> None:
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.dropped_turns = dropped_turns

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """A loaded model plus one long-lived worker thread per concurrent reply.

    Long-lived workers matter on the CPU: each new thread would start its own
    OpenMP pool while the old one still spins, which halves tokens/s on small machines.
    """

    def __init__(self, model: object, tokenizer: object, placement: Placement, workers: int = 1,
                 vision: Optional["Vision"] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.placement = placement
        self.vision = vision  # a LLaVA model's image side; None for a text model
        self.stop_ids = self._stop_ids()
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        self.workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")
        self._active = 0
        self._active_lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, hardware: str, requested_dtype: str = "auto", loader: str = "native",
             workers: int = 1, quantize: str = "none", adapter: Optional[Path] = None,
             llava: Optional[Path] = None, visual_encoder: Optional[Path] = None) -> "Engine":
        """``llava``: an XTuner LLaVA folder whose LLM adapter goes into the base at ``path``, and whose
        projector and visual adapter go with the CLIP tower at ``visual_encoder``."""
        placement = choose_placement(hardware, requested_dtype, quantize)
        vision = None
        if llava is not None:
            from ..model.llava_layout import find_llava
            from .llava import Vision

            layout = find_llava(llava)
            if layout is None:
                raise ValueError(f"{llava} is not an XTuner LLaVA folder (no projector/config.json)")
            adapter = adapter or layout.llm_adapter
            vision = Vision.load(layout, visual_encoder or llava, vision_dtype(placement), placement.device)
        model, tokenizer = load_model(path, placement, loader, adapter)
        if placement.int8:
            from . import int8

            choice, seconds = int8.use_fastest_kernels_(model, placement.dtype)
            print(choice.log_line(seconds), flush=True)
            placement = replace(placement, label=f"{placement.label} ({choice.label})")
        return cls(model, tokenizer, placement, workers, vision)

    @property
    def active(self) -> int:
        """Replies being generated right now."""
        return self._active

    def _stop_ids(self) -> List[int]:
        """eos and <|im_end|>, whatever generation_config.json lists: repos often list eos alone."""
        ids = set()
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(i for i in ids if isinstance(i, int))

    def encode_chat(self, messages: List[Message]) -> List[int]:
        """The repo's chat template when it has one, else InternLM2's format; always as plain ids. With images,
        llava.IMAGE_MARK stands where each image's embeddings go."""
        images = any(m.get("images") for m in messages)
        if images:
            from .llava import tokenize_with_images

            messages = with_image_slots(messages)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = internlm2_prompt(messages, self.tokenizer.bos_token or "")
        if images:
            return tokenize_with_images(self.tokenizer, text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_length(self, ids: Sequence[int]) -> int:
        """Positions the prompt takes in the context: each image mark stands for all its patches."""
        if self.vision is None:
            return len(ids)
        from .llava import IMAGE_MARK

        return len(ids) + ids.count(IMAGE_MARK) * (self.vision.tokens_per_image - 1)

    def fit_prompt(
        self, system: str, history: List[Message], message: str, max_new_tokens: int, images: Sequence[bytes] = ()
    ) -> Tuple[List[int], int]:
        """Drop the oldest turns until prompt + reply fit the context; return ids and turns dropped.

        History messages may carry ``images`` (bytes), as may the new message; the ids then hold one mark per
        image still in the prompt, the last ones sent (see ``start``)."""
        count = len(images) + sum(len(m.get("images") or ()) for m in history)
        if count and self.vision is None:
            raise ImageError(TEXT_ONLY)
        if count > MAX_IMAGES:
            raise ImageError(TOO_MANY)
        budget = self.context_length - min(max_new_tokens, self.context_length // 2)
        head = [{"role": "system", "content": system}] if system else []
        tail = [{"role": "user", "content": message, **({"images": list(images)} if images else {})}]
        dropped = 0
        while True:
            ids = self.encode_chat(head + history + tail)
            if self.prompt_length(ids) <= budget:
                return ids, dropped
            if not history:
                raise InputTooLong(self.prompt_length(ids), budget)
            # Drop through the next user turn so the history still starts with the user.
            cut = next((i for i, m in enumerate(history) if i > 0 and m["role"] == "user"), len(history))
            history = history[cut:]
            dropped += 1

    def start(
        self,
        ids: List[int],
        emit: Callable[[object], None],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        dropped_turns: int = 0,
        images: Sequence[bytes] = (),
    ) -> Generation:
        """Start generating; ``emit`` gets each text piece, then an exception or Generation.DONE.

        ``images``: every image of the conversation in order; the last ones, one per mark in ids, are used."""
        generation = Generation(dropped_turns)
        device = self.model.device
        sampling: Dict[str, object] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        kept = self._kept_images(ids, images)
        kwargs = dict(
            attention_mask=torch.ones((1, self.prompt_length(ids)), dtype=torch.long, device=device),
            max_new_tokens=max(1, min(max_new_tokens, self.context_length - self.prompt_length(ids))),
            eos_token_id=self.stop_ids,
            pad_token_id=self.stop_ids[0],
            repetition_penalty=repetition_penalty,
            stopping_criteria=StoppingCriteriaList([_Cancelled(generation.cancelled)]),
            streamer=_TextSink(IncrementalDecoder(self.tokenizer, self.stop_ids), emit),
            **sampling,
        )

        def work() -> None:
            with self._active_lock:
                self._active += 1
            try:
                reset_dynamic_rope(self.model)
                with torch.inference_mode():
                    self.model.generate(**self._inputs(ids, kept), **kwargs)
                emit(Generation.DONE)
            except Exception as error:  # reaches the user as a chat message, the app keeps serving
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                emit(error)
            finally:
                with self._active_lock:
                    self._active -= 1
                generation.finished.set()

        self.workers.submit(work)
        return generation

    def _kept_images(self, ids: Sequence[int], images: Sequence[bytes]) -> List[bytes]:
        if self.vision is None:
            return []
        from .llava import IMAGE_MARK

        marks = list(ids).count(IMAGE_MARK)
        return list(images[len(images) - marks:]) if marks else []

    def _inputs(self, ids: Sequence[int], images: Sequence[bytes]) -> Dict[str, torch.Tensor]:
        """input_ids, or for a prompt with images the spliced embeddings (encoding the images here, on the
        generate thread, so their time counts as the reply's)."""
        if not images:
            return {"input_ids": torch.tensor([list(ids)], device=self.model.device)}
        from .llava import splice

        assert self.vision is not None
        features = [self.vision.embed(data) for data in images]
        return {"inputs_embeds": splice(self.model.get_input_embeddings(), ids, features)}
