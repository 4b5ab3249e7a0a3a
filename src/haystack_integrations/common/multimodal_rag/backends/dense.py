"""The CLIP-family dual encoder behind the three multimodal dense embedders.

Any checkpoint that transformers loads with `AutoModel` + `AutoProcessor` and that has
`get_text_features` / `get_image_features` works (CLIP, SigLIP, SigLIP 2, ...). Loaded encoders are
shared between components that ask for the same model on the same device, so a text embedder and a
document embedder in one process hold one copy of the weights.

Text is tokenized as each family was trained:

- SigLIP and SigLIP 2 (`model_type` "siglip" / "siglip2"): `input_ids` only (no attention mask), padded on the
  right with `padding="max_length"` to the trained length (64). The released SigLIP tokenizers return only
  `input_ids` (`"model_input_names": ["input_ids"]` in e.g. google/siglip-so400m-patch14-384's
  tokenizer_config.json, no `padding_side`, so right) and transformers says "make sure to set
  padding="max_length" as that's how the model was trained" (transformers 5.23 `models/siglip/modeling_siglip.py`
  :507, :691, :770). The text tower pools the LAST position (`last_hidden_state[:, -1, :]`,
  `modeling_siglip.py`:538-540; `modeling_siglip2.py`:654-656), which with right padding is a pad token, as in
  training; a mask or left padding would change every embedding. `Siglip2Tokenizer` pads left by class default
  (`tokenization_siglip2.py`:37), so the side is forced here. SigLIP 2 "was trained with *lowercased* text"
  (transformers `docs/source/en/model_doc/siglip2.md`, Notes; `Siglip2Tokenizer` lowercases, but FixRes SigLIP 2
  checkpoints have model_type "siglip" and a Gemma tokenizer that does not), so text is lowercased here unless
  the tokenizer is SigLIP v1's, which canonicalizes (lowercases) itself (`tokenization_siglip.py`:249-270).
- CLIP: `input_ids` + `attention_mask`, padded to 77 (`max_position_embeddings`, `configuration_clip.py`:53);
  the causal mask makes the pooled EOS state independent of right padding (`modeling_clip.py`:534-571).

Default dtype and attention kernel: see `acceleration.py` (applied by `load_model_and_processor`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from haystack import logging
from haystack.document_stores.types import DocumentStore
from haystack.utils import ComponentDevice, Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import (
    CachedModel,
    LoadSpec,
    checkpoint_fingerprint,
    load_model_and_processor,
    model_dtype,
)
from haystack_integrations.common.multimodal_rag.errors import ModelLoadError
from haystack_integrations.common.multimodal_rag.index_guard import IndexModelGuard

logger = logging.getLogger(__name__)

_TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
#: Model types tokenized the SigLIP way (input_ids only, right padding to max length).
SIGLIP_FAMILY: tuple[str, ...] = ("siglip", "siglip2")
#: Text length the SigLIP family was trained with (big_vision `tokenize(max_len=64)`; transformers'
#: `Siglip2Processor` text defaults `{"padding": "max_length", "truncation": True, "max_length": 64}`).
SIGLIP_TRAINED_LENGTH = 64
_DTYPE_KEYS = ("dtype", "torch_dtype")
#: Key of the CUDA event in `image_inputs`' result that says when GPU preprocessing on the side stream is done.
_READY = "_multimodal_rag_ready"


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose `pooler_output` is the projected embedding; 4.x a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None and isinstance(output, (tuple, list)):
        pooled = output[1] if len(output) > 1 else output[0]
    if not isinstance(pooled, torch.Tensor):
        msg = f"unexpected output of the encoder's feature method: {type(output).__name__}"
        raise TypeError(msg)
    return pooled


def _features(output: Any, normalize: bool) -> torch.Tensor:
    """The pooled embeddings of a tower's output as float32, L2-normalised when asked, on the model's device."""
    features = _pooled(output).float()
    return torch.nn.functional.normalize(features, p=2, dim=-1) if normalize else features


class DenseEncoder(CachedModel):
    """
    A loaded dual encoder: text tower and vision tower into one vector space.

    Use `DenseEncoder.get(LoadSpec(...))` to load (or reuse) one.
    """

    def __init__(self, model: Any, processor: Any, device: str, model_id: str, *, token: Any = None) -> None:
        """
        Wrap a loaded model and processor.

        :param model: A model with `get_text_features` and `get_image_features`.
        :param processor: Its processor (tokenizer + image processor).
        :param device: Torch device string the model lives on.
        :param model_id: The id or path it was loaded from (for messages).
        :param token: Hugging Face token secret (to find a Hub checkpoint's files for its fingerprint).
        """
        self.model = model
        self.processor = processor
        self.device = device
        self.model_id = model_id
        self._token = token
        self._identity: dict[str, Any] | None = None
        self._stream: Any = None  # the CUDA stream of GPU preprocessing, created on first use
        self._gpu_preprocess_failed = False  # warned once that the GPU resize refused a batch
        self.tokenizer: Any = getattr(processor, "tokenizer", None)
        self.image_processor: Any = getattr(processor, "image_processor", None)
        if self.tokenizer is None or self.image_processor is None:
            msg = f"the processor of '{model_id}' lacks a tokenizer or an image processor; a dual encoder needs both"
            raise ModelLoadError(msg)
        self.dtype = model_dtype(model)
        self.family: str | None = getattr(getattr(model, "config", None), "model_type", None)
        self.max_length = self._text_max_length()
        self.lowercase = self.family in SIGLIP_FAMILY and not _lowercases_itself(self.tokenizer)

    @classmethod
    def _load(cls, spec: LoadSpec) -> DenseEncoder:
        from transformers import AutoModel, AutoProcessor

        hf_model, processor = load_model_and_processor(
            AutoModel.from_pretrained,
            AutoProcessor.from_pretrained,
            spec,
            model_what="model",
            processor_what="processor",
        )
        if not (hasattr(hf_model, "get_text_features") and hasattr(hf_model, "get_image_features")):
            msg = (
                f"{spec.component}: '{spec.model}' loads as {type(hf_model).__name__}, which has no "
                "get_text_features/get_image_features: use a CLIP-family dual encoder (CLIP, SigLIP, SigLIP 2)."
            )
            raise ModelLoadError(msg)
        return cls(hf_model, processor, spec.device, spec.model, token=spec.token)

    def _text_max_length(self) -> int:
        candidates = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            candidates.append(tok_max)
        config = getattr(self.model, "config", None)
        text_config = getattr(config, "text_config", None)
        pos = getattr(text_config, "max_position_embeddings", None)
        if isinstance(pos, int) and pos > 0:
            candidates.append(pos)
        if candidates:
            return min(candidates)
        return SIGLIP_TRAINED_LENGTH

    def _prepare(self, texts: list[str]) -> list[str]:
        return [t.lower() for t in texts] if self.lowercase else list(texts)

    def text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """
        The tokenizer outputs fed to the text tower, as the family was trained (see the module docstring).

        :param texts: The texts.
        :returns: `{"input_ids": ...}` for SigLIP / SigLIP 2, `{"input_ids": ..., "attention_mask": ...}` for CLIP
            (CPU tensors of shape `(len(texts), max_length)`).
        """
        prepared = self._prepare(texts)
        if self.family in SIGLIP_FAMILY:
            encoded = self.tokenizer(
                prepared,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                padding_side="right",
                return_attention_mask=False,
                return_tensors="pt",
            )
            return {"input_ids": encoded["input_ids"]}
        encoded = self.tokenizer(
            prepared, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: encoded[k] for k in _TEXT_INPUT_KEYS if k in encoded}

    def token_counts(self, texts: list[str]) -> list[int]:
        """
        The number of tokens of each text before truncation (special tokens included).

        :param texts: The texts.
        :returns: One count per text; a text with more than `max_length` tokens is truncated when embedded.
        """
        if not texts:
            return []
        encoded = self.tokenizer(self._prepare(texts), padding=False, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], *, normalize: bool) -> np.ndarray:
        """
        Embed texts with the text tower.

        Texts are padded to a fixed length (as CLIP/SigLIP were trained), so a text's embedding does not
        depend on the other texts in its batch. Texts longer than `max_length` tokens are truncated (see
        `token_counts`).

        :param texts: The texts.
        :param normalize: L2-normalise each embedding.
        :returns: `float32` array of shape `(len(texts), dim)`.
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        kwargs = {k: v.to(self.device) for k, v in self.text_inputs(texts).items()}
        return _features(self.model.get_text_features(**kwargs), normalize).cpu().numpy()

    def identity(self) -> dict[str, Any]:
        """
        What identifies this encoder's vector space (computed once per loaded encoder).

        :returns: `{"model": id or path as configured, "fingerprint": checkpoint_fingerprint(...) (content of
            config and weights, the same identity the multi-vector stores record), "dimension": int}`.
        """
        if self._identity is None:
            dimension = int(self.embed_texts(["a"], normalize=False).shape[1])
            self._identity = {
                "model": self.model_id,
                "fingerprint": checkpoint_fingerprint(self.model_id, token=self._token),
                "dimension": dimension,
            }
        return dict(self._identity)

    def _preprocess_stream(self) -> Any:
        """The CUDA stream GPU preprocessing runs on (one per encoder, created on first use)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=torch.device(self.device))
        return self._stream

    def image_inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        """
        The image processor's tensors for `images`: on a CUDA model, computed on the GPU by a torchvision-backed
        processor (the default in transformers 5), else on the host in page-locked memory.

        `MultimodalDocumentEmbedder` runs it in its background thread while the model embeds the previous batch.

        :param images: RGB images (at least one).
        :returns: The processor's outputs, ready for `embed_image_inputs`.
        """
        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        if cuda and getattr(self.image_processor, "backend", None) == "torchvision":
            # transformers' torchvision image processors resize and normalise on the device they are given: on a
            # GPU that is ~0.1 ms per image, where the same work on the host (34 ms per 640x480 image on a 2-vCPU
            # Xeon) kept the GPU waiting (issue 15). Same operations, same library; only the device differs.
            # It runs on a side stream: on the default stream its host-to-device copies would wait for the forward
            # pass of the previous batch, and the GPU would then wait for them (measured 273 images/s on an H100).
            stream = self._preprocess_stream()
            try:
                with torch.cuda.stream(stream):
                    pixels = uint8_pixels(images, self.device)
                    if pixels is None:
                        processed = self.image_processor(images=images, return_tensors="pt", device=self.device)
                    else:
                        processed = self.image_processor(
                            images=pixels, return_tensors="pt", device=self.device, input_data_format="channels_first"
                        )
                    gpu_inputs = dict(processed)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                gpu_inputs[_READY] = ready
                return gpu_inputs
            except RuntimeError as error:
                # torch's antialiased CUDA resize refuses large downscale factors ("Too much shared memory
                # required", e.g. a 2000 px photo for a 32 px model; seen on an H100 in the tiny quickstart): this
                # batch is preprocessed on the host instead, the reference path (same operations).
                log = logger.debug if self._gpu_preprocess_failed else logger.warning  # once per encoder
                self._gpu_preprocess_failed = True
                log(
                    "{model}: GPU image preprocessing failed for a batch of {count} image(s) ({error}); it was "
                    "preprocessed on the host (later batches try the GPU first, and are not logged again)",
                    model=self.model_id,
                    count=len(images),
                    error=f"{type(error).__name__}: {error}",
                )
        inputs = self.image_processor(images=images, return_tensors="pt")
        return {
            key: (value.pin_memory() if cuda and isinstance(value, torch.Tensor) else value)
            for key, value in inputs.items()
        }

    def embed_image_inputs(self, inputs: dict[str, Any], *, normalize: bool) -> np.ndarray:
        """
        Embed a batch `image_inputs` prepared.

        :param inputs: From `image_inputs`.
        :param normalize: L2-normalise each embedding.
        :returns: `float32` array of shape `(batch, dim)`.
        """
        return self.start_embedding(inputs, normalize=normalize).result()

    @torch.inference_mode()
    def start_embedding(self, inputs: dict[str, Any], *, normalize: bool) -> PendingEmbeddings:
        """
        Queue the embedding of a batch `image_inputs` prepared, without waiting for the GPU.

        On CUDA the forward pass and a non-blocking copy of the embeddings into page-locked host memory are queued
        and the call returns, so the caller can queue the next batch while this one runs (waiting for each batch's
        result before queueing the next left the GPU idle while the host launched the next forward). Elsewhere the
        result is computed at once.

        :param inputs: From `image_inputs`.
        :param normalize: L2-normalise each embedding.
        :returns: The batch's pending result; `result()` gives the `float32` `(batch, dim)` array.
        """
        non_blocking = self.device.startswith("cuda")
        ready = inputs.get(_READY)
        # Prepared on the side stream: the model's stream waits for it and keeps its memory until done. The model's
        # device's stream, not the current device's: a model on cuda:1 runs on cuda:1's stream.
        stream = None
        if ready is not None:
            stream = torch.cuda.current_stream(torch.device(self.device))
            stream.wait_event(ready)
        kwargs: dict[str, Any] = {}
        for key, value in inputs.items():
            if key == _READY:
                continue
            if stream is not None and isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(stream)
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=non_blocking)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            kwargs[key] = value
        features = _features(self.model.get_image_features(**kwargs), normalize)
        if not features.is_cuda:
            return PendingEmbeddings(features.numpy(), None)
        host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(features, non_blocking=True)  # queued on the stream of the features' device
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(features.device))
        return PendingEmbeddings(host, done)

    def embed_images(self, images: list[Image.Image], *, normalize: bool) -> np.ndarray:
        """
        Embed images with the vision tower.

        :param images: RGB images.
        :param normalize: L2-normalise each embedding.
        :returns: `float32` array of shape `(len(images), dim)`.
        """
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        return self.embed_image_inputs(self.image_inputs(images), normalize=normalize)


#: Largest page-locked staging block of `uint8_pixels` (one image when an image is larger). torch keeps freed
#: page-locked blocks for reuse; a block is reused once its copy is done, so this bounds what the staging holds
#: to a few such blocks (a batch of 64 twelve-megapixel photos would otherwise pin ~2.3 GB per batch in flight).
STAGING_BYTES = 32 * 1024 * 1024


def uint8_pixels(images: list[Image.Image], device: str) -> list[torch.Tensor] | None:
    """
    RGB images as the `(3, H, W)` uint8 tensors transformers' torchvision image processors make of them, on `device`.

    The processor converts each PIL image on the host by itself (a copy into RGB, one into NumPy, a transposing
    copy) and copies each one to the GPU from pageable memory, which makes the host wait for every copy: 0.8-1.1
    ms of host work per 640x480 image on a 2-vCPU Xeon, in the thread that feeds the GPU (issue 15). Here the
    images of one size are copied once each into page-locked blocks of at most `STAGING_BYTES`, moved in one
    asynchronous copy per block, and transposed on the device (0.38 ms per image on the same machine). The
    processor then does what it does with its own tensors: its outputs are equal (`tests/test_dense_backend.py`).
    Pass the result with `input_data_format="channels_first"`.

    :param images: The images of one batch.
    :param device: Where the tensors go (page-locked staging and asynchronous copies on CUDA).
    :returns: One tensor per image, in order; `None` when an image is not plain RGB (another mode, or a
        transparency key, which the processor composites itself): then the processor should get the images.
    """
    if not images or not all(image.mode == "RGB" and "transparency" not in image.info for image in images):
        return None
    cuda = torch.device(device).type == "cuda"
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.size, []).append(i)
    pixels: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for (width, height), positions in by_size.items():
        per_chunk = max(1, STAGING_BYTES // (width * height * 3))
        for start in range(0, len(positions), per_chunk):
            chunk = positions[start : start + per_chunk]
            staged = torch.empty((len(chunk), height, width, 3), dtype=torch.uint8, pin_memory=cuda)
            rows = staged.numpy()
            for row, i in enumerate(chunk):
                rows[row] = np.asarray(images[i])
            batch = staged.to(device, non_blocking=cuda).permute(0, 3, 1, 2).contiguous()
            for i, tensor in zip(chunk, batch.unbind(0), strict=True):
                pixels[i] = tensor
    return pixels


class PendingEmbeddings:
    """A batch's embeddings being copied back from the GPU (`DenseEncoder.start_embedding`)."""

    def __init__(self, values: np.ndarray | torch.Tensor, done: torch.cuda.Event | None) -> None:
        self._values = values
        self._done = done

    def result(self) -> np.ndarray:
        """Wait for the batch (if it still runs) and return its `float32` `(batch, dim)` embeddings."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        if isinstance(self._values, torch.Tensor):
            self._values = self._values.numpy()
        return self._values


def _lowercases_itself(tokenizer: Any) -> bool:
    """SigLIP v1's SentencePiece tokenizer canonicalizes (lowercases) text itself when `do_lower_case` is set."""
    try:
        from transformers import SiglipTokenizer
    except ImportError:  # sentencepiece/protobuf missing: such a tokenizer cannot have been loaded either
        return False
    return isinstance(tokenizer, SiglipTokenizer) and bool(getattr(tokenizer, "do_lower_case", False))


class DenseEmbedderBase:
    """
    What the three dense embedders share: their loading settings, the encoder loaded at `warm_up`, the index guard.

    Each embedder still lists every init parameter in its own `__init__` and `to_dict` (house style); it calls
    `_init_dense` to store the shared ones and inherits `warm_up`. `_GUARD_ROLE` says how the guard checks the
    index: `"query"` (a query embedder: the index must have been built with this model) or `"write"` (the document
    embedder: the index must hold no other model's vectors).
    """

    _GUARD_ROLE: ClassVar[Literal["query", "write"]] = "query"

    model: str
    device: ComponentDevice | None
    token: Secret | None
    normalize_embeddings: bool
    local_files_only: bool
    model_kwargs: dict[str, Any] | None
    document_store: DocumentStore | None
    _encoder: DenseEncoder | None
    _guard: IndexModelGuard | None

    def _init_dense(
        self,
        model: str,
        device: ComponentDevice | None,
        token: Secret | None,
        normalize_embeddings: bool,
        local_files_only: bool,
        model_kwargs: dict[str, Any] | None,
        document_store: DocumentStore | None,
        /,
    ) -> None:
        """
        Store the shared settings; nothing is loaded.

        Positional (each embedder passes its own parameters of the same names, in this order, on one line).
        """
        self.model = model
        self.device = device
        self.token = token
        self.normalize_embeddings = normalize_embeddings
        self.local_files_only = local_files_only
        self.model_kwargs = model_kwargs
        self.document_store = document_store
        self._encoder = None
        self._guard = (
            IndexModelGuard(document_store, component=type(self).__name__) if document_store is not None else None
        )

    def warm_up(self) -> None:
        """
        Load the model and processor (idempotent), then check the index's model when a `document_store` is set.

        :raises ModelLoadError: When the model cannot be loaded; the message says how to fix it.
        :raises EmbeddingModelMismatchError: When the document store holds vectors of another model.
        """
        if self._encoder is None:
            self._encoder = DenseEncoder.get(LoadSpec.of(self))
        if self._guard is None and self._GUARD_ROLE == "query":
            return
        # The document embedder records the identity on every document, so it is computed at warm-up; the query
        # embedders compute it only for the guard.
        identity = self._encoder.identity()
        if self._guard is not None:
            self._guard.check(identity, role=self._GUARD_ROLE)
