from __future__ import annotations

import base64
import io
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.dataclasses import ChatMessage, ImageContent
from PIL import Image

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.media import (
    PAGE_NUMBER_META_KEY,
    VISUAL_MODALITIES,
    load_document_image,
    modality_of,
)
from haystack_integrations.common.multimodal_rag.numerics.ranking import score_sort_key
from haystack_integrations.common.multimodal_rag.validation import (
    check_image_size,
    check_query,
    compile_template,
)

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """\
Answer the question using only the numbered sources. Cite the sources you use by their numbers, like [1] or [2][3]. \
If the sources do not contain the answer, say so.
{% if image_sources %}
The images above are sources {% for s in image_sources %}[{{ s.number }}]{{ ", " if not loop.last }}{% endfor %}.
{% endif %}{% if text_sources %}
Text sources:
{% for s in text_sources %}[{{ s.number }}] {{ s.content }}
{% endfor %}{% endif %}
Question: {{ query }}"""


def _encode_jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@component
class MultimodalChatPromptBuilder:
    """
    Builds one multimodal user message from retrieved text, images and PDF pages, numbered for citation.

    Image and page documents become `ImageContent` parts (PDF pages are rendered from `meta["page_number"]`),
    each preceded by its number `[n]`; text documents are inlined in the rendered template with theirs.
    `sources` maps every number to the document id, file path, page number, modality and score, so an answer
    citing `[2]` can be traced to its page. The message works with any Haystack chat generator that accepts
    images (`OpenAIChatGenerator`, `OllamaChatGenerator`, `LlamaCppChatGenerator`, `LocalVLMChatGenerator`, ...).

    Only the `max_images` best-scored image/page documents are shown (VLMs degrade with many images); they are
    resized to fit `image_size` when set. An image that cannot be read is left out with a warning and listed
    in `sources` as skipped (the next best image takes its place); the builder never fails on one bad file.
    Numbers follow the order of the incoming documents (best first after a ranker).

    The `template` is Jinja2 (sandboxed) and renders the text part; it receives `query`, `text_sources`
    (`number`, `content`, `meta`, `score`) and `image_sources` (`number`, `meta`, `score`). Images come before
    the text in the message.

    ### Usage example
    ```python
    from haystack_integrations.components.builders.multimodal import MultimodalChatPromptBuilder

    builder = MultimodalChatPromptBuilder(max_images=4, image_size=(1024, 1024))
    result = builder.run(query="What was Q3 revenue?", documents=ranked_documents)
    messages, sources = result["messages"], result["sources"]
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
        :raises ValueError: On a template with a syntax error or invalid sizes.
        """
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0:
            msg = f"max_images must be a non-negative integer, got {max_images!r}"
            raise ValueError(msg)
        self.image_size = check_image_size(image_size)
        self._template = compile_template(template, DEFAULT_TEMPLATE, parameter="template")
        self.template = template
        self.max_images = max_images
        self.file_path_meta_field = file_path_meta_field
        self.root_path = root_path
        self.system_prompt = system_prompt

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
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalChatPromptBuilder:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    def _source_entry(self, doc: Document, modality: str | None) -> dict[str, Any]:
        return {
            "number": None,
            "document_id": doc.id,
            "file_path": doc.meta.get(self.file_path_meta_field),
            "page_number": doc.meta.get(PAGE_NUMBER_META_KEY),
            "modality": modality,
            "score": doc.score,
            "included": False,
            "skipped_reason": None,
        }

    @component.output_types(messages=list[ChatMessage], sources=list[dict[str, Any]])
    def run(self, query: str, documents: list[Document]) -> dict[str, Any]:
        """
        Build the prompt.

        :param query: The user's question.
        :param documents: Ranked documents (text, images, PDF pages); not modified.
        :returns: A dictionary with:
            - `messages`: `[system message (if set), user message]`; the user message holds the numbered image
              parts followed by the rendered text.
            - `sources`: one dict per input document, in input order: `number` (`None` if left out),
              `document_id`, `file_path`, `page_number`, `modality`, `score`, `included`, `skipped_reason`.
        :raises ValueError: On an empty query.
        """
        check_query(type(self).__name__, query)
        entries: list[dict[str, Any]] = []
        modalities: list[str | None] = []
        for doc in documents:
            try:
                modality: str | None = modality_of(doc, file_path_meta_field=self.file_path_meta_field)
            except MediaError as e:
                entry = self._source_entry(doc, None)
                entry["skipped_reason"] = str(e)
                entries.append(entry)
                modalities.append(None)
                continue
            entries.append(self._source_entry(doc, modality))
            modalities.append(modality)

        # Best-scored images first; a bad file gives its slot to the next one.
        visual = [i for i, m in enumerate(modalities) if m in VISUAL_MODALITIES]
        visual.sort(key=lambda i: score_sort_key(documents[i]))
        images: dict[int, Image.Image] = {}
        skipped: list[str] = []
        for i in visual:
            if len(images) >= self.max_images:
                entries[i]["skipped_reason"] = f"over max_images={self.max_images}"
                continue
            try:
                images[i] = load_document_image(
                    documents[i],
                    str(modalities[i]),
                    file_path_meta_field=self.file_path_meta_field,
                    root_path=self.root_path,
                    fit=self.image_size,
                )
            except MediaError as e:
                entries[i]["skipped_reason"] = f"unreadable: {e}"
                skipped.append(f"'{documents[i].id}': {e}")
        if skipped:
            logger.warning(
                "MultimodalChatPromptBuilder left out {count} unreadable image(s): {details}",
                count=len(skipped),
                details="; ".join(skipped),
            )

        number = 0
        text_sources: list[dict[str, Any]] = []
        image_sources: list[dict[str, Any]] = []
        for i, doc in enumerate(documents):
            modality = modalities[i]
            if modality is None:
                continue
            if modality in VISUAL_MODALITIES:
                if i not in images:
                    continue
                number += 1
                image_sources.append({"number": number, "meta": doc.meta, "score": doc.score, "position": i})
            else:
                if not doc.content or not doc.content.strip():
                    entries[i]["skipped_reason"] = "text document without content"
                    continue
                number += 1
                text_sources.append({"number": number, "content": doc.content, "meta": doc.meta, "score": doc.score})
            entries[i]["number"] = number
            entries[i]["included"] = True

        parts: list[Any] = []
        for source in image_sources:
            i = source["position"]
            entry = entries[i]
            label = f"[{source['number']}] {entry['modality']}"
            if entry["file_path"]:
                label += f" {entry['file_path']}"
            if entry["page_number"] is not None and entry["modality"] == "page":
                label += f", page {entry['page_number']}"
            parts.append(label)
            image = images[i]
            parts.append(
                ImageContent(
                    base64_image=_encode_jpeg(image),
                    mime_type="image/jpeg",
                    meta={"document_id": documents[i].id, "source_number": source["number"]},
                )
            )
            image.close()
        parts.append(self._template.render(query=query, text_sources=text_sources, image_sources=image_sources))

        messages = []
        if self.system_prompt:
            messages.append(ChatMessage.from_system(self.system_prompt))
        messages.append(ChatMessage.from_user(content_parts=parts))
        return {"messages": messages, "sources": entries}
