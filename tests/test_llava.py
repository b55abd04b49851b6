"""The app's LLaVA engine answers as ``xtuner chat --llava ... --prompt-template internlm2_chat`` computes.

Oracle: written here from XTuner's algorithm with plain torch, transformers and peft (remote-code InternLM2 with
the LLM LoRA merged by peft, CLIPVisionModel with the visual LoRA merged by peft, the projector as an
nn.Sequential, CLIPImageProcessor, the image spliced between separately tokenised chunks), never from the app.
"""

from __future__ import annotations

import io
import json
import queue
import sys
from pathlib import Path

import llava_fixture as lf
import pytest
from conftest import TEMPLATE_APP

sys.path.insert(0, str(TEMPLATE_APP))

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel  # noqa: E402
from xlab_chat.engines import images as img  # noqa: E402
from xlab_chat.engines.llava import IMAGE_MARK  # noqa: E402
from xlab_chat.engines.transformers_engine import Engine, Generation  # noqa: E402
from xlab_chat.model.llava_layout import find_llava  # noqa: E402

QUESTION = "What is in this picture?"
TOKENS = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return lf.build_world(tmp_path_factory.mktemp("llava"))


def photo(width: int = 90, height: int = 50, seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A non-square picture (so the padding matters) with varied pixels."""
    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=gen) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB").convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (what a decompression bomb looks like to a reader)."""
    import struct
    import zlib

    data = bytearray(photo(8, 8))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header[4:]
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


# ------------------------------------------------------------------ the oracle, from XTuner's algorithm

def oracle_llm(world: dict, folder: Path) -> nn.Module:
    llm = AutoModelForCausalLM.from_pretrained(str(world["base"]), trust_remote_code=True, dtype=torch.float32)
    if (folder / "llm_adapter").is_dir():
        llm = PeftModel.from_pretrained(llm, str(folder / "llm_adapter")).merge_and_unload()
    return llm.eval()


def oracle_tower(world: dict, folder: Path) -> nn.Module:
    tower = CLIPVisionModel.from_pretrained(str(world["clip"]), dtype=torch.float32)
    adapter = folder / "visual_encoder_adapter"
    if not adapter.is_dir():
        return tower.eval()
    config = json.loads((adapter / "adapter_config.json").read_text())
    peft_tower = get_peft_model(tower, LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                                  target_modules=config["target_modules"], bias=config["bias"]))
    path = next(adapter.glob("adapter_model.*"))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        saved = load_file(str(path))
    else:
        saved = torch.load(str(path), weights_only=True)
    names = {name for name, _ in tower.named_parameters()}
    if not any(name.startswith("vision_model.") for name in names):  # transformers 5 dropped this level
        saved = {key.replace(".vision_model.", ".", 1): value for key, value in saved.items()}
    result = set_peft_model_state_dict(peft_tower, saved)
    assert not result.unexpected_keys
    return peft_tower.merge_and_unload().eval()


def oracle_projector(folder: Path) -> nn.Module:
    config = json.loads((folder / "projector" / "config.json").read_text())
    projector = nn.Sequential(nn.Linear(config["visual_hidden_size"], config["llm_hidden_size"]), nn.GELU(),
                              nn.Linear(config["llm_hidden_size"], config["llm_hidden_size"]))
    path = next((folder / "projector").glob("*.safetensors"), None) or folder / "projector" / "pytorch_model.bin"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        saved = load_file(str(path))
    else:
        saved = torch.load(str(path), weights_only=True)
    projector.load_state_dict({key.removeprefix("model."): value for key, value in saved.items()})
    return projector.eval()


def expand2square(image: Image.Image, colour: tuple) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    if width > height:
        out = Image.new(image.mode, (width, width), colour)
        out.paste(image, (0, (width - height) // 2))
    else:
        out = Image.new(image.mode, (height, height), colour)
        out.paste(image, ((height - width) // 2, 0))
    return out


def oracle_inputs(world: dict, folder: Path, llm: nn.Module, data: bytes, question: str) -> torch.Tensor:
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = processor_class.from_pretrained(str(world["clip"]))
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = oracle_tower(world, folder)(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = oracle_projector(folder)(hidden)[0]
    tokenizer = AutoTokenizer.from_pretrained(str(world["base"]), trust_remote_code=True)
    prompt = "<|im_start|>user\n" + "<image>\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
    first, second = prompt.split("<image>")
    embed = llm.get_input_embeddings()
    with torch.no_grad():
        parts = [embed(torch.tensor(tokenizer.encode(first))), features,
                 embed(torch.tensor(tokenizer.encode(second, add_special_tokens=False)))]
    return torch.cat(parts).unsqueeze(0)


class KVCache:
    """The key/value store the fixture's remote-code attention writes to (``update(k, v, layer)``)."""

    def __init__(self) -> None:
        self.layers: dict = {}

    def get_seq_length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple:
        if layer in self.layers:
            k = torch.cat([self.layers[layer][0], k], dim=2)
            v = torch.cat([self.layers[layer][1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


def oracle_logits(llm: nn.Module, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The remote-code LLM's forward from input embeddings (its own forward takes ids only)."""
    start = cache.get_seq_length()
    x = embeds
    with torch.no_grad():
        for layer in llm.model.layers:
            x = layer(x, start, cache)
        return llm.output(llm.model.norm(x))[0, -1].float()


def oracle_greedy(llm: nn.Module, embeds: torch.Tensor, stop: list) -> tuple:
    """First-step logits and the greedy reply's ids, as generate(do_sample=False) would give them."""
    cache = KVCache()
    first = logits = oracle_logits(llm, embeds, cache)
    ids = []
    while len(ids) < TOKENS:
        token = int(logits.argmax())
        if token in stop:
            break
        ids.append(token)
        with torch.no_grad():
            logits = oracle_logits(llm, llm.get_input_embeddings()(torch.tensor([[token]])), cache)
    return first, ids


def stop_ids(world: dict) -> list:
    return [2, json.loads((world["base"] / "generation_config.json").read_text())["eos_token_id"][1]]


# ------------------------------------------------------------------ the app's engine

def app_engine(world: dict, folder: Path) -> Engine:
    return Engine.load(world["base"], "cpu", "float32", "native", 1, "none", llava=folder,
                       visual_encoder=world["clip"])


def reply(engine: Engine, ids: list, images: list) -> str:
    inbox: queue.Queue = queue.Queue()
    engine.start(ids, inbox.put, TOKENS, 0.0, 0.8, 1.0, images=images)
    pieces = []
    while (item := inbox.get(timeout=120)) is not Generation.DONE:
        if isinstance(item, Exception):
            raise item
        pieces.append(item)
    return "".join(pieces)


@pytest.mark.parametrize("variant", ["safetensors", "bin", "pretrain"])
def test_replies_and_logits_match_xtuner_chat(world: dict, variant: str) -> None:
    folder = world[variant]
    data = photo()
    llm = oracle_llm(world, folder)
    embeds = oracle_inputs(world, folder, llm, data, QUESTION)
    expected_logits, expected_ids = oracle_greedy(llm, embeds, stop_ids(world))
    tokenizer = AutoTokenizer.from_pretrained(str(world["base"]), trust_remote_code=True)
    expected_text = tokenizer.decode(expected_ids, skip_special_tokens=True)

    engine = app_engine(world, folder)
    ids, dropped = engine.fit_prompt("", [], QUESTION, TOKENS, images=[data])
    assert dropped == 0 and ids.count(IMAGE_MARK) == 1
    with torch.no_grad():
        ours = engine.model(**engine._inputs(ids, [data])).logits[0, -1]
    assert expected_logits.std() > 0.5
    torch.testing.assert_close(ours, expected_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        inputs = engine._inputs(ids, [data])
        greedy = engine.model.generate(**inputs, attention_mask=torch.ones(inputs["inputs_embeds"].shape[:2],
                                       dtype=torch.long), do_sample=False, max_new_tokens=TOKENS,
                                       eos_token_id=engine.stop_ids, pad_token_id=2)[0].tolist()
    assert len(expected_ids) > 5
    assert [t for t in greedy if t not in engine.stop_ids] == expected_ids
    # The stream holds back a trailing incomplete character (U+FFFD) that the untrained model never completes.
    assert reply(engine, ids, [data]) == expected_text.rstrip("\ufffd")


def test_the_image_and_both_adapters_really_matter(world: dict) -> None:
    """The comparison above could not pass by accident: other pixels, or a part left out, change the logits."""
    folder = world["safetensors"]
    llm = oracle_llm(world, folder)
    base = oracle_logits(llm, oracle_inputs(world, folder, llm, photo(seed=0), QUESTION), KVCache())
    other = oracle_logits(llm, oracle_inputs(world, folder, llm, photo(seed=1), QUESTION), KVCache())
    no_visual_lora = oracle_logits(llm, oracle_inputs(world, world["pretrain"], llm, photo(seed=0), QUESTION),
                                   KVCache())
    assert (base - other).abs().max() > 1e-2
    assert (base - no_visual_lora).abs().max() > 1e-2


def test_layout_is_found(world: dict) -> None:
    full, pretrain = find_llava(world["safetensors"]), find_llava(world["pretrain"])
    assert full is not None and full.llm_adapter and full.visual_adapter and full.llm is None
    assert pretrain is not None and pretrain.llm_adapter is None and pretrain.visual_adapter is None
    assert find_llava(world["base"]) is None


def test_a_later_turn_image_opens_that_turn(world: dict) -> None:
    """As trained: '<image>\\n' + question in the turn that brought the image; earlier turns stay text."""
    engine = app_engine(world, world["pretrain"])
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, _ = engine.fit_prompt("", history, QUESTION, TOKENS, images=[photo()])
    mark = ids.index(IMAGE_MARK)
    encode = engine.tokenizer
    before = "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n"
    assert ids.count(IMAGE_MARK) == 1
    assert ids[:mark] == encode(before, add_special_tokens=False)["input_ids"]
    after = "\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"
    assert ids[mark + 1:] == encode(after, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", ["not-an-image", "corrupt", "huge", "animated", "rgba", "palette"])
def test_bad_uploads(world: dict, case: str) -> None:
    engine = app_engine(world, world["pretrain"])
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    data = {"not-an-image": b"%PDF-1.4 not a picture", "corrupt": photo()[:200], "huge": huge_png(12000, 12000),
            "animated": animated.getvalue(), "rgba": photo(mode="RGBA"), "palette": photo(mode="P")}[case]
    ids, _ = engine.fit_prompt("", [], QUESTION, TOKENS, images=[data])
    if case in ("rgba", "palette"):  # flattened and answered
        assert reply(engine, ids, [data])
        return
    with pytest.raises(img.ImageError) as caught:
        reply(engine, ids, [data])
    assert caught.value.reason == {"not-an-image": img.NOT_IMAGE, "corrupt": img.CORRUPT, "huge": img.TOO_LARGE,
                                   "animated": img.ANIMATED}[case]


def test_too_many_images_and_text_only_models_are_refused(world: dict, tiny_model: Path) -> None:
    engine = app_engine(world, world["pretrain"])
    history = [{"role": "user", "content": "look", "images": [photo()]}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(img.ImageError) as caught:
        engine.fit_prompt("", history, QUESTION, TOKENS, images=[photo(seed=1)])
    assert caught.value.reason == img.TOO_MANY
    text_only = Engine.load(tiny_model, "cpu", "float32")
    with pytest.raises(img.ImageError) as caught:
        text_only.fit_prompt("", [], QUESTION, TOKENS, images=[photo()])
    assert caught.value.reason == img.TEXT_ONLY


def test_int8_on_the_cpu_keeps_the_tower_in_float(world: dict) -> None:
    """QUANTIZE=auto on the CPU: the LLM's Linears in int8, the CLIP tower and projector in the CPU's best float."""
    from xlab_chat.engines.int8 import Int8Linear
    from xlab_chat.engines.transformers_engine import cpu_runs_bf16_well

    engine = Engine.load(world["base"], "cpu", "auto", "native", 1, "auto", llava=world["safetensors"],
                         visual_encoder=world["clip"])
    assert engine.placement.int8 and any(isinstance(m, Int8Linear) for m in engine.model.modules())
    want = torch.bfloat16 if cpu_runs_bf16_well() else torch.float32
    assert engine.vision.dtype == want and next(engine.vision.tower.parameters()).dtype == want
    ids, _ = engine.fit_prompt("", [], QUESTION, TOKENS, images=[photo()])
    assert reply(engine, ids, [photo()])
