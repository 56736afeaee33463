"""Loading VLMs, their processors, LoRA attach / save / reload, and 4-bit QLoRA on CPU."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tests.tiny_models import FAMILIES, build_tiny_model
from ttrv.config import LoraConfig, ModelConfig
from ttrv.loading import (
    LANGUAGE_MODULES,
    LoadedModel,
    ModelLoadError,
    eos_token_ids,
    load_model,
    resolve_dtype,
    suppressed_token_ids,
)
from ttrv.lora import (
    adapter_state,
    attach_lora,
    load_adapter,
    load_adapter_state,
    lora_parameters,
    save_adapter,
)
from ttrv.processors import IMAGE_ONLY_PROCESSORS, torchvision_available

QUESTION = "Which digit is shown? Answer with a single digit."
N_PROJECTIONS = 7 * 2  # default LoRA targets x 2 layers


def _inputs(loaded: LoadedModel, n_images: int = 1) -> dict:
    """Chat-template prompt with an image, through the model's own processor."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = loaded.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    images = [Image.new("RGB", (36, 28), (40 * i, 90, 200 - 30 * i)) for i in range(n_images)]
    return dict(loaded.processor(text=[text] * n_images, images=images, return_tensors="pt"))


def _first_token_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]  # [B, V]


def _is_lm_module(name: str) -> bool:
    return any(f"{scope}." in name for scope in LANGUAGE_MODULES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_and_samples_without_special_tokens(tiny_model_dir, family):
    """Guards: a processor silently degrading to a tokenizer (no torchvision), a broken chat
    template / image expansion, and rollouts sampling image placeholders (the next forward
    then fails with 'Image features and image tokens do not match')."""
    loaded = load_model(ModelConfig(model=str(tiny_model_dir(family))))
    assert loaded.family == family
    assert loaded.processor.image_processor is not None
    assert loaded.tokenizer is loaded.processor.tokenizer
    if family in IMAGE_ONLY_PROCESSORS and not torchvision_available():
        assert type(loaded.processor) is IMAGE_ONLY_PROCESSORS[family][2]
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.info["trainable_params"] == 0 < loaded.info["total_params"] < 1_000_000

    suppressed = suppressed_token_ids(loaded.tokenizer, loaded.model)
    eos = eos_token_ids(loaded.tokenizer, loaded.model)
    config = loaded.model.config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert image_id in suppressed and not set(eos) & set(suppressed)
    assert loaded.tokenizer.eos_token_id in eos

    inputs = _inputs(loaded)
    torch.manual_seed(0)
    out = loaded.model.generate(
        **inputs,
        do_sample=True,
        num_return_sequences=4,
        max_new_tokens=5,
        suppress_tokens=suppressed,
        eos_token_id=eos,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]  # [4, <=5]
    assert new.shape[0] == 4
    for row in new.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), len(row))
        assert not set(row[: stop + 1]) & set(suppressed), row
    for scores in out.scores:  # [4, V] per step: suppressed ids can never be drawn
        assert torch.isneginf(scores[:, suppressed]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_only_on_language_model_and_base_frozen(tiny_model_dir, family):
    """Guards: LoRA leaking into the vision tower / projector (they also have q_proj,
    v_proj, down_proj) and base weights left trainable."""
    loaded = load_model(ModelConfig(model=str(tiny_model_dir(family))))
    model = attach_lora(loaded.model, LoraConfig(), seed=0)
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(lora_modules) == N_PROJECTIONS
    assert all(_is_lm_module(name) for name in lora_modules), sorted(lora_modules)
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
    assert len(lora_parameters(model)) == 2 * N_PROJECTIONS


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_round_trip_gives_identical_logits(tiny_model_dir, family, tmp_path):
    """Guards: an adapter that does not reload onto a fresh model (wrong module names,
    pickle instead of safetensors, LoRA B left out) so a saved run cannot be resumed."""
    folder = str(tiny_model_dir(family))
    loaded = load_model(ModelConfig(model=folder))
    inputs = _inputs(loaded)
    base = _first_token_logits(loaded.model, inputs)
    model = attach_lora(loaded.model, LoraConfig(rank=4), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the adapter an effect
        for param in lora_parameters(model):
            param.add_(0.5 * torch.randn(param.shape, generator=gen))
    adapted = _first_token_logits(model, inputs)
    assert not torch.allclose(adapted, base)

    path = save_adapter(model, tmp_path / "adapter")
    assert path.name == "adapter_model.safetensors" and path.is_file()
    assert not list(path.parent.glob("*.bin"))

    fresh = load_model(ModelConfig(model=folder))
    reloaded = load_adapter(fresh.model, path.parent, trainable=False)
    torch.testing.assert_close(_first_token_logits(reloaded, inputs), adapted, rtol=0, atol=1e-6)


def test_lora_seed_and_in_memory_rollback(tiny_model_dir):
    """Guards: unseeded LoRA init (runs not reproducible) and a rollback that does not
    restore the exact adapter weights."""
    folder = str(tiny_model_dir("llava"))
    states = [
        adapter_state(attach_lora(load_model(ModelConfig(model=folder)).model, LoraConfig(), 7))
        for _ in range(2)
    ]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

    model = attach_lora(load_model(ModelConfig(model=folder)).model, LoraConfig(), 7)
    snapshot = adapter_state(model)
    with torch.no_grad():
        for param in lora_parameters(model):
            param.add_(1.0)
    assert not all(torch.equal(snapshot[k], v) for k, v in adapter_state(model).items())
    load_adapter_state(model, snapshot)
    assert all(torch.equal(snapshot[k], v) for k, v in adapter_state(model).items())
    with pytest.raises(KeyError):
        load_adapter_state(model, {"not.a.lora_A.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", ["{tmp}/no/such/model", "no-such-org/no-such-model-xyz"])
def test_missing_model_raises_clear_error(tmp_path, name):
    """Guards: a raw OSError / HFValidationError (or a download attempt) for a mistyped
    folder or an id that is not in the offline cache."""
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(model=name))
    message = str(err.value)
    assert name in message and "local folder" in message and "cache" in message


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("keep_tokenizer", [False, True])
def test_folder_without_image_processor_raises(tiny_model_dir, tmp_path, family, keep_tokenizer):
    """Guards: AutoProcessor silently returning a bare tokenizer (or failing deep inside)
    for a folder that has weights but no image processor files."""
    src = tiny_model_dir(family)
    keep = ["config.json", "generation_config.json", "model.safetensors"]
    if keep_tokenizer:
        keep += ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    for name in keep:
        shutil.copy(src / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="processor"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_trust_remote_code_off_by_default_and_passed_through(tiny_model_dir, monkeypatch):
    """Guards: running code shipped with a checkpoint without the user opting in."""
    seen: list[tuple[str, object]] = []
    for cls in (AutoModelForImageTextToText, AutoConfig, AutoProcessor):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "missing")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    folder = str(tiny_model_dir("llava"))
    load_model(ModelConfig(model=folder))
    assert {name for name, _ in seen} == {
        "AutoModelForImageTextToText",
        "AutoConfig",
        "AutoProcessor",
    }
    assert all(value is False for _, value in seen), seen
    seen.clear()
    load_model(ModelConfig(model=folder, trust_remote_code=True))
    assert seen and all(value is True for _, value in seen), seen


def test_auto_dtype():
    """Guards: fp32 on GPU (2x memory) or bf16 on CPU (slow, inexact) by default."""
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_tiny_models_are_deterministic(tmp_path):
    """Guards: tiny test models that differ between builds (flaky tests, unstable
    fixtures) or that move the global RNG of the test that builds them."""
    rng = torch.get_rng_state()
    digests = []
    for i in range(2):
        folder = build_tiny_model("qwen2_vl", tmp_path / str(i))
        files = ("model.safetensors", "tokenizer.json")
        digests.append([hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files])
    assert digests[0] == digests[1]
    assert torch.equal(rng, torch.get_rng_state())
    with pytest.raises(ValueError, match="Unknown tiny family"):
        build_tiny_model("nope", tmp_path / "x")


def _quantized_names(model) -> list[str]:
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_on_cpu_gets_lora_gradients_after_generate(tiny_model_dir, bits):
    """Guards: the bitsandbytes CPU trap (AVX512-BF16 repacking after the first eval
    forward makes 4-bit LoRA gradients zero/None) and quantising the vision side (tiny
    vision Linear layers are not multiples of 64 and fail at the first forward)."""
    loaded = load_model(ModelConfig(model=str(tiny_model_dir("llava")), quantization=bits))
    quantized = _quantized_names(loaded.model)
    assert len(quantized) == N_PROJECTIONS and all(_is_lm_module(n) for n in quantized)
    assert loaded.info["quantization"] == bits
    model = attach_lora(loaded.model, LoraConfig(), seed=0)
    inputs = _inputs(loaded, n_images=2)
    model.eval()
    model.generate(  # the trap: the first eval-mode forward
        **inputs,
        do_sample=True,
        max_new_tokens=3,
        suppress_tokens=suppressed_token_ids(loaded.tokenizer, model),
    )
    model.train()
    params = dict((n, p) for n, p in model.named_parameters() if "lora_" in n)
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1)
    for _ in range(2):  # step 1: B grads (A's are zero while B == 0); step 2: all
        optimizer.zero_grad()
        logits = model(**inputs).logits[:, -1]  # [2, V]
        logits.log_softmax(-1)[:, 5].sum().backward()
        optimizer.step()
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm", "gemma3"])
def test_4bit_skips_each_familys_vision_side(tiny_model_dir, family):
    """Guards: skip patterns that silently match nothing for a family (e.g. a bare
    'visual'), which quantises the vision tower and breaks the first forward."""
    loaded = load_model(ModelConfig(model=str(tiny_model_dir(family)), quantization="4bit"))
    assert all(_is_lm_module(n) for n in _quantized_names(loaded.model))
    inputs = _inputs(loaded)
    out = loaded.model.generate(
        **inputs,
        max_new_tokens=2,
        do_sample=False,
        suppress_tokens=suppressed_token_ids(loaded.tokenizer, loaded.model),
    )
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_adapter_folder_without_safetensors_is_rejected(tiny_model_dir, tmp_path):
    """Guards: loading a pickled (.bin) or missing adapter instead of failing clearly."""
    loaded = load_model(ModelConfig(model=str(tiny_model_dir("llava"))))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(loaded.model, tmp_path)


def test_offline_fixture_is_active():
    """Guards: a test session that could reach the hub (slow, flaky, leaks downloads)."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


def _pickle_copy(src, dest, keep_safetensors: bool = False):
    """A copy of the model folder `src` whose weights are a pickle (`pytorch_model.bin`,
    what `save_pretrained(safe_serialization=False)` wrote before transformers 5)."""
    from safetensors.torch import load_file

    shutil.copytree(src, dest)
    torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
    if not keep_safetensors:
        (dest / "model.safetensors").unlink()
    return dest


def test_pickle_only_weights_load_with_a_warning(tiny_model_dir, tmp_path, caplog):
    """Guards: base weights silently read from a pickle although safetensors are promised."""
    src = tiny_model_dir("llava")
    reference = load_model(ModelConfig(model=str(src)))
    assert reference.info["weights_format"] == "safetensors" and reference.info["warnings"] == []
    folder = _pickle_copy(src, tmp_path / "pickled")
    with caplog.at_level("WARNING", logger="ttrv.loading"):
        loaded = load_model(ModelConfig(model=str(folder)))
    assert loaded.info["weights_format"] == "pickle"
    (message,) = loaded.info["warnings"]
    assert "pickle" in message and "pytorch_model.bin" in message and "safetensors" in message
    assert message in caplog.text
    inputs = _inputs(reference)  # the same weights came in: same logits
    assert torch.equal(
        _first_token_logits(loaded.model, inputs), _first_token_logits(reference.model, inputs)
    )


def test_safetensors_are_preferred_over_a_pickle_beside_them(tiny_model_dir, tmp_path, monkeypatch):
    """Guards: a pickle next to safetensors being read (it is never even opened)."""
    folder = _pickle_copy(tiny_model_dir("llava"), tmp_path / "both", keep_safetensors=True)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    kwargs_seen: list[dict] = []
    original = AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        kwargs_seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy)
    loaded = load_model(ModelConfig(model=str(folder)))
    assert loaded.info["weights_format"] == "safetensors" and loaded.info["warnings"] == []
    assert kwargs_seen[0]["use_safetensors"] is True and kwargs_seen[0]["weights_only"] is True


def test_pickle_weights_warning_reaches_the_session(tiny_model_dir, tmp_path):
    """Guards: the pickle warning staying in a log nobody reads; the UI shows session
    warnings (Inspect tab), once per session however many jobs load the model."""
    from sessions import Store, jobs
    from sessions.worker import Worker, run_until_idle
    from ttrv.config import AdaptConfig

    folder = _pickle_copy(tiny_model_dir("llava"), tmp_path / "pickled")
    config = AdaptConfig().to_dict()
    config["model"]["model"] = str(folder)
    with Store(tmp_path / "data") as store:
        sid = store.create_session("s", config, str(folder), "open")
        store.add_images(sid, [{"image": Image.new("RGB", (8, 8), (1, 2, 3)), "name": "a"}])
        worker = Worker(store)
        for _ in range(2):
            jobs.submit(store, "baseline", {}, sid)
            run_until_idle(worker)
            assert jobs.latest(store, "baseline", sid)["status"] == "done"
        warnings = [e["data"]["message"] for e in store.events(sid, kind="warning")]
        assert len(warnings) == 1 and "pickle" in warnings[0], warnings
