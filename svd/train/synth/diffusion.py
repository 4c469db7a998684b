"""SDXL pipelines for synthetic images: loading them, running one a step at a time, a tiny random one.

Slicing: a diffusers pipeline call is one long function, and the engine
worker's idle lane wants slices. `Stepper` runs the call in its own thread and
hands the turn back and forth: the worker's slice lets the thread run until
the pipeline's `callback_on_step_end` (one denoising step), then waits for it.
The thread only ever runs while the worker thread waits for it inside a slice,
so the accelerator still has one user at a time. The first slice also encodes
the prompts (and, image-to-image, the source image); the last one decodes the
latents with the VAE. On CUDA each slice ends with a synchronize, so a slice's
time is its work's and the next batch does not queue behind it.

Loading never downloads: the model is a folder, or a repo in the local
Hugging Face cache (`local_files_only`).
"""

from __future__ import annotations

import gc
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from svd.config import SynthConfig

log = structlog.get_logger(__name__)

FETCH_HINT = (
    "svd never downloads it. On this box: hf auth login, then hf download {model} --include '*.json' "
    "'*.txt' '*fp16.safetensors' (docs/synth.md)"
)


class SynthUnavailable(Exception):
    """Generation cannot start here: diffusers missing, the model not on disk, or no GPU."""


class StepperStopped(Exception):
    """Raised inside the pipeline's thread to end a call that was stopped between two steps."""


@dataclass
class Pipelines:
    """Text-to-image and image-to-image over the same weights, on one device."""

    t2i: Any
    i2i: Any
    device: str
    dtype: str
    model: str

    def tokenizers(self) -> list[Any]:
        return [t for t in (self.t2i.tokenizer, self.t2i.tokenizer_2) if t is not None]


def pick_device(cfg: SynthConfig, force: bool = False) -> str:
    """cuda or cpu, from [synth] device; raises SynthUnavailable for a CPU unless allowed or forced."""
    import torch

    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise SynthUnavailable("synth.device is cuda but torch sees no CUDA device")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and has_cuda) else "cpu"
    if device == "cpu" and not (cfg.allow_cpu or force):
        raise SynthUnavailable(
            "no GPU: an SDXL image takes minutes on a CPU and would hold the engine's idle time for hours. "
            "Set [synth] allow_cpu = true or pass --force to generate anyway."
        )
    return device


def load_pipelines(cfg: SynthConfig, device: str, model: str | None = None) -> Pipelines:
    """Loads the SDXL pipeline from a folder or the local hub cache onto `device`; slow (seconds to minutes).

    Args:
        model: cfg.model resolved (Config.synth_model: a relative folder against the config's directory).

    Raises:
        SynthUnavailable: diffusers is not installed, or the model is not on disk.
        RuntimeError: the model is on disk but does not load (a download cut short, a wrong folder).
    """
    try:
        import torch
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
        from diffusers.utils import logging as diffusers_logging
    except ImportError as exc:
        raise SynthUnavailable(f"synthetic images need the synth extra: pip install 'svd[synth]' ({exc})") from exc
    diffusers_logging.disable_progress_bar()  # its loading bars would go to journald line by line
    dtype = getattr(torch, cfg.dtype) if device == "cuda" else torch.float32
    source = model or cfg.model
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    try:
        t2i = _with_variant(StableDiffusionXLPipeline, source, cfg.variant, kwargs)
    except (OSError, ValueError) as exc:
        if _on_disk(source):
            raise RuntimeError(f"{source} is on this box but does not load: {exc}") from exc
        hint = FETCH_HINT.format(model=source)
        raise SynthUnavailable(f"{source} is not on this box ({exc}); {hint}") from exc
    t2i.set_progress_bar_config(disable=True)
    if cfg.offload and device == "cuda":
        t2i.enable_model_cpu_offload()
    else:
        t2i.to(device)
    i2i: Any = StableDiffusionXLImg2ImgPipeline(**t2i.components)  # the same modules, no second copy
    i2i.set_progress_bar_config(disable=True)
    log.info("synth_pipeline_loaded", model=source, device=device, dtype=str(dtype), offload=cfg.offload)
    return Pipelines(t2i, i2i, device, str(dtype).removeprefix("torch."), source)


def _with_variant(cls: Any, source: str, variant: str, kwargs: dict[str, Any]) -> Any:
    """from_pretrained with the weight files' variant (fp16) where there are such files, else the plain ones
    (a folder written by save_pretrained, the tiny pipeline)."""
    if variant:
        try:
            return cls.from_pretrained(source, variant=variant, **kwargs)
        except (OSError, ValueError) as exc:
            if variant not in str(exc):
                raise
            log.info("synth_variant_missing", model=source, variant=variant)
    return cls.from_pretrained(source, **kwargs)


def _on_disk(source: str) -> bool:
    """A folder, or a repo whose model_index.json is in the local hub cache."""
    if Path(source).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(source, "model_index.json"), str)
    except ValueError:  # not a repo id at all
        return False


def release(pipes: Pipelines | None) -> None:
    """Drops the pipeline's modules and gives their memory back (the GPU's cache too)."""
    if pipes is None:
        return
    pipes.t2i = pipes.i2i = None
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Stepper:
    """Runs `call(step_end)` in a thread, one pipeline step per `step()` (see the module doc).

    `call` must pass `step_end` to the pipeline as callback_on_step_end. step() blocks until the
    thread reaches the next step's end or finishes; stop() ends the call at its next step.
    """

    def __init__(self, call: Callable[[Callable[..., Any]], Any], device: str) -> None:
        self._call = call
        self._cuda = device == "cuda"
        self._turn = threading.Semaphore(0)  # the thread may run
        self._yielded = threading.Semaphore(0)  # the thread stopped at a step's end, or finished
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="svd-synth", daemon=True)
        self.steps = 0
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None

    def step(self) -> bool:
        """Lets the call run one step; True when it has finished (see result and error)."""
        if self.finished:
            return True
        if not self._thread.is_alive():
            self._thread.start()
        self._turn.release()
        self._yielded.acquire()
        return self.finished

    def stop(self) -> None:
        """Ends the call at its next step's end (raising StepperStopped in it) and waits for the thread."""
        if self.finished or not self._thread.is_alive():
            self.finished = True
            return
        self._stopping = True
        self._turn.release()
        self._yielded.acquire()
        self._thread.join()

    def _main(self) -> None:
        self._turn.acquire()
        try:
            if not self._stopping:
                self.result = self._call(self._step_end)
        except StepperStopped:
            pass
        except BaseException as exc:  # an OOM or a bug: the job that drives this sees it
            # Without its frames: they hold the pipeline and its activations (GBs on a GPU), and the
            # error outlives this call in the job's outcome.
            traceback.clear_frames(exc.__traceback__)
            self.error = exc.with_traceback(None)
        finally:
            try:
                self._sync()  # a sticky CUDA error raises here too: the worker must still get its turn back
            except BaseException as exc:
                self.error = self.error or RuntimeError(f"CUDA synchronize failed: {exc}")
            finally:
                self.finished = True
                self._yielded.release()

    def _step_end(self, _pipe: Any, _index: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.steps += 1
        self._sync()
        self._yielded.release()
        self._turn.acquire()
        if self._stopping:
            raise StepperStopped
        return kwargs

    def _sync(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize()


# --- a tiny random SDXL pipeline: tests, the demo, benchmarks (real diffusers code, nothing fetched) --


# Words the tiny tokenizer keeps whole, as CLIP's BPE keeps common English words: prompts then count
# about as many tokens as on the real model.
def _tiny_words() -> list[str]:
    from svd.train.synth import prompts

    parts = [prompts.PREFIX, prompts.NO_ROADWORK, *prompts.ELEMENTS, *prompts.WHERE, *prompts.ROADS]
    text = " ".join([*parts, *prompts.LIGHT, *prompts.TRAFFIC, "of with a road"])
    return sorted(set(prompts.words_of(text)))


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table, which CLIP's tokenizer uses for its base vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            out.append(256 + extra)
            extra += 1
    return [chr(c) for c in out]


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer whose BPE merges are learnt (by the tokenizers library) from the prompt
    vocabulary: those words come out whole, as CLIP keeps common words; any other text byte by byte."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4 * len(chars) + 4000, initial_alphabet=chars, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([" ".join(_tiny_words())], trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    # transformers' annotation says list[str]; its BPE takes (left, right) pairs, as its own loader makes.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def build_tiny_pipeline(out: Path, seed: int = 0) -> Path:
    """Writes a tiny SDXL pipeline with random weights to `out` (save_pretrained): diffusers' real UNet,
    VAE, CLIP text encoders, tokenizers and SDXL's Euler scheduler, sized to run on a CPU in
    milliseconds per step. It draws noise, not streets; its use is the machinery around it."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + text_encoder_2's 32
        cross_attention_dim=64,  # both encoders' hidden states side by side
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=128,
    )
    text = CLIPTextConfig(
        bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1,
        pad_token_id=len(tokenizer) - 1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=77,
    )
    # SDXL base 1.0's scheduler settings (its scheduler_config.json).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text),
        text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
