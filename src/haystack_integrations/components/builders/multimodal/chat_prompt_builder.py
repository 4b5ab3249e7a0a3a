from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections import OrderedDict
from typing import Any, TypedDict

from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.dataclasses import ChatMessage, ImageContent
from PIL import Image

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.failures import check_documents_input
from haystack_integrations.common.multimodal_rag.inputs.media import (
    PAGE_NUMBER_META_KEY,
    VISUAL_MODALITIES,
    MediaLocation,
    is_tiff_path,
    load_fitted_image,
    locate,
    modality_of,
)
from haystack_integrations.common.multimodal_rag.numerics.ranking import score_sort_key
from haystack_integrations.common.multimodal_rag.validation import (
    check_image_size,
    check_int,
    check_query,
    compile_template,
)

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """\
Answer the question using only the numbered sources. Cite the sources you use by their numbers, like [1] or [2][3]. \
If the sources do not contain the answer, say so.
{% if image_citations %}
The images above are sources {% for c in image_citations %}[{{ c.number }}]{{ ", " if not loop.last }}{% endfor %}.
{% endif %}{% if text_citations %}
Text sources:
{% for c in text_citations %}[{{ c.number }}] {{ c.content }}
{% endfor %}{% endif %}
Question: {{ query }}"""

#: Encoded images kept across queries, at most this many bytes of base64 in all (besides `image_cache_size`).
IMAGE_CACHE_MAX_BYTES = 64 * 1024 * 1024


class Citation(TypedDict):
    """
    One entry of the builder's `citations` output, per input document, in input order.

    :param number: The number the document is cited by in the prompt (`[n]`), `None` when it was left out.
    :param document_id: The document's id.
    :param file_path: `meta[file_path_meta_field]` as stored (`None` for text without a file).
    :param page_number: `meta["page_number"]` as stored.
    :param modality: `"text"`, `"image"` or `"page"`; `None` when it could not be determined.
    :param score: The document's score.
    :param included: Whether it is in the prompt.
    :param skipped_reason: Why it was left out (`None` when included).
    """

    number: int | None
    document_id: str
    file_path: Any
    page_number: Any
    modality: str | None
    score: float | None
    included: bool
    skipped_reason: str | None


def _encode_jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class _EncodedImageCache:
    """A thread-safe LRU of base64 JPEGs, bounded by entries and by bytes."""

    def __init__(self, max_entries: int, max_bytes: int = IMAGE_CACHE_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> str | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[Any, ...], value: str) -> None:
        if self.max_entries == 0 or len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._items)


def _cache_key(source: MediaLocation, size: tuple[int, int] | None) -> tuple[Any, ...] | None:
    """What identifies an encoded image: the file (and its modification time and size) or the blob's hash."""
    if source.path is not None:
        try:
            stat = source.path.stat()
        except OSError:
            return None
        return ("file", str(source.path), source.page_number, size, stat.st_mtime_ns, stat.st_size)
    if source.data is not None:
        digest = hashlib.blake2b(source.data, digest_size=16).digest()
        return ("blob", digest, source.page_number, size)
    return None


@component
class MultimodalChatPromptBuilder:
    """
    Builds one multimodal user message from retrieved text, images and PDF pages, numbered for citation.

    Image and page documents become `ImageContent` parts (PDF pages are rendered from `meta["page_number"]`),
    each preceded by its number `[n]`; text documents are inlined in the rendered template with theirs.
    `citations` maps every number to the document id, file path, page number, modality and score (a `Citation`
    per input document), so an answer citing `[2]` can be traced to its page. The message works with any Haystack
    chat generator that accepts images (`OpenAIChatGenerator`, `OllamaChatGenerator`, `LlamaCppChatGenerator`,
    `LocalVLMChatGenerator`, ...).

    Only the `max_images` best-scored image/page documents are shown (VLMs degrade with many images); they are
    resized to fit `image_size` when set. Pixels come from the shared loader (EXIF orientation applied,
    transparency on white, extreme aspect ratios padded). An image that cannot be read, or a document whose
    `file_path` is malformed (not a string, a NUL byte, a name over 255 bytes), is left out with a warning and
    listed in `citations` as skipped (the next best image takes its place); the builder never fails on one bad
    file. Numbers follow the order of the incoming documents (best first after a ranker).

    Encoded images are cached across queries (an LRU of `image_cache_size` entries and at most 64 MiB, keyed by
    file, page, `image_size` and the file's modification time and size; blobs by a hash of their bytes), so a
    page that is retrieved again is not decoded and JPEG-encoded again.

    The `template` is Jinja2 (sandboxed) and renders the text part; it receives `query`, `text_citations`
    (`number`, `content`, `meta`, `score`) and `image_citations` (`number`, `meta`, `score`). Images come before
    the text in the message. `text_sources` / `image_sources` are the same lists under their old names
    (deprecated, removed in 0.3).

    The `sources` output is the same list as `citations`, under its old name: deprecated, removed in 0.3.

    ### Usage example
    ```python
    from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder

    builder = MultimodalChatPromptBuilder(max_images=4, image_size=(1024, 1024))
    result = builder.run(query="What was Q3 revenue?", documents=ranked_documents)
    messages, citations = result["messages"], result["citations"]
    ```
    """

    def __init__(
        self,
        *,
        template: str | None = None,
        max_images: int = 4,
        image_size: tuple[int, int] | list[int] | None = None,
        file_path_meta_field: str = "file_path",
        root_path: str | None = None,
        system_prompt: str | None = None,
        image_cache_size: int = 32,
    ) -> None:
        """
        Create the builder.

        :param template: Jinja2 template of the text part; `None` uses a citation-oriented default.
        :param max_images: Most image/page documents to include (0 includes none).
        :param image_size: `(width, height)` box that images are shrunk to fit (aspect ratio kept); `None` keeps
            their size.
        :param file_path_meta_field: Meta key holding the path of a document's image or PDF.
        :param root_path: Directory that relative file paths are resolved in; paths escaping it are refused.
        :param system_prompt: Optional system message put before the user message.
        :param image_cache_size: Encoded images kept across queries (LRU; also capped at 64 MiB in all);
            0 turns the cache off.
        :raises ValueError: On a template with a syntax error or invalid sizes.
        """
        check_int("max_images", max_images, minimum=0)
        check_int("image_cache_size", image_cache_size, minimum=0)
        self.image_size = check_image_size(image_size)
        self._template = compile_template(template, DEFAULT_TEMPLATE, parameter="template")
        self.template = template
        self.max_images = max_images
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self.system_prompt = system_prompt
        self.image_cache_size = image_cache_size
        self._image_cache = _EncodedImageCache(image_cache_size)

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            template=self.template,
            max_images=self.max_images,
            image_size=list(self.image_size) if self.image_size is not None else None,
            file_path_meta_field=self.file_path_meta_field,
            root_path=self.root_path,
            system_prompt=self.system_prompt,
            image_cache_size=self.image_cache_size,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalChatPromptBuilder:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    def _citation(self, doc: Document, modality: str | None) -> Citation:
        return Citation(
            number=None,
            document_id=doc.id,
            file_path=doc.meta.get(self.file_path_meta_field),
            page_number=doc.meta.get(PAGE_NUMBER_META_KEY),
            modality=modality,
            score=doc.score,
            included=False,
            skipped_reason=None,
        )

    def _encoded_image(self, document: Document, modality: str) -> str:
        """The base64 JPEG of an image/page document, from the cache when its file has not changed."""
        source = locate(document, modality, file_path_meta_field=self.file_path_meta_field, root_path=self.root_path)
        key = _cache_key(source, self.image_size) if self.image_cache_size > 0 else None
        if key is not None:
            cached = self._image_cache.get(key)
            if cached is not None:
                return cached
        image = load_fitted_image(source, fit=self.image_size)
        try:
            encoded = _encode_jpeg(image)
        finally:
            image.close()
        if key is not None:
            self._image_cache.put(key, encoded)
        return encoded

    @component.output_types(messages=list[ChatMessage], citations=list[Citation], sources=list[dict[str, Any]])
    def run(self, query: str, documents: list[Document]) -> dict[str, Any]:
        """
        Build the prompt.

        :param query: The user's question.
        :param documents: Ranked documents (text, images, PDF pages); not modified.
        :returns: A dictionary with:
            - `messages`: `[system message (if set), user message]`; the user message holds the numbered image
              parts followed by the rendered text.
            - `citations`: one `Citation` per input document, in input order: `number` (`None` if left out),
              `document_id`, `file_path`, `page_number`, `modality`, `score`, `included`, `skipped_reason`.
            - `sources`: a copy of `citations` under the old name (deprecated; removed in 0.3).
        :raises ValueError: On an empty query.
        :raises TypeError: When `documents` is not a list (or tuple) of Documents.
        """
        check_query(type(self).__name__, query)
        check_documents_input(type(self).__name__, documents, allow_tuple=True)
        citations: list[Citation] = []
        modalities: list[str | None] = []
        for doc in documents:
            try:
                modality: str | None = modality_of(doc, file_path_meta_field=self.file_path_meta_field)
            except MediaError as e:
                citation = self._citation(doc, None)
                citation["skipped_reason"] = str(e)
                citations.append(citation)
                modalities.append(None)
                continue
            citations.append(self._citation(doc, modality))
            modalities.append(modality)

        # Best-scored images first; a bad file gives its slot to the next one.
        visual = [i for i, m in enumerate(modalities) if m in VISUAL_MODALITIES]
        visual.sort(key=lambda i: score_sort_key(documents[i]))
        images: dict[int, str] = {}
        skipped: list[str] = []
        for i in visual:
            if len(images) >= self.max_images:
                citations[i]["skipped_reason"] = f"over max_images={self.max_images}"
                continue
            try:
                images[i] = self._encoded_image(documents[i], str(modalities[i]))
            except MediaError as e:
                citations[i]["skipped_reason"] = f"unreadable: {e}"
                skipped.append(f"'{documents[i].id}': {e}")
        if skipped:
            logger.warning(
                "MultimodalChatPromptBuilder left out {count} unreadable image(s): {details}",
                count=len(skipped),
                details="; ".join(skipped),
            )

        number = 0
        text_citations: list[dict[str, Any]] = []
        image_citations: list[dict[str, Any]] = []
        for i, doc in enumerate(documents):
            modality = modalities[i]
            if modality is None:
                continue
            if modality in VISUAL_MODALITIES:
                if i not in images:
                    continue
                number += 1
                image_citations.append({"number": number, "meta": doc.meta, "score": doc.score, "position": i})
            else:
                if not doc.content or not doc.content.strip():
                    citations[i]["skipped_reason"] = "text document without content"
                    continue
                number += 1
                text_citations.append({"number": number, "content": doc.content, "meta": doc.meta, "score": doc.score})
            citations[i]["number"] = number
            citations[i]["included"] = True

        parts: list[Any] = []
        for entry in image_citations:
            i = entry["position"]
            citation = citations[i]
            label = f"[{entry['number']}] {citation['modality']}"
            if citation["file_path"]:
                label += f" {citation['file_path']}"
            if citation["page_number"] is not None and (
                citation["modality"] == "page"
                or (isinstance(citation["file_path"], str) and is_tiff_path(citation["file_path"]))
            ):  # a PDF page or a page of a multi-page TIFF scan (another image's page_number is not its own)
                label += f", page {citation['page_number']}"
            parts.append(label)
            parts.append(
                ImageContent(
                    base64_image=images[i],
                    mime_type="image/jpeg",
                    # "source_number" is the deprecated name of "citation_number" (removed in 0.3).
                    meta={
                        "document_id": documents[i].id,
                        "citation_number": entry["number"],
                        "source_number": entry["number"],
                    },
                    # We encoded it ourselves (valid base64 JPEG): Haystack's validation would decode every
                    # image again on every query (most of a cached query's time).
                    validation=False,
                )
            )
        parts.append(
            self._template.render(
                query=query,
                text_citations=text_citations,
                image_citations=image_citations,
                # Deprecated names of the two lists above (removed in 0.3).
                text_sources=text_citations,
                image_sources=image_citations,
            )
        )

        messages = []
        if self.system_prompt:
            messages.append(ChatMessage.from_system(self.system_prompt))
        messages.append(ChatMessage.from_user(content_parts=parts))
        return {"messages": messages, "citations": citations, "sources": [dict(c) for c in citations]}
