"""YAML parsing with a bound on the size of the document once its aliases are expanded.

PyYAML shares the node of an anchor between its aliases, so a few hundred bytes of nested aliases
("billion laughs": `a: &a [x, x]`, `b: &b [*a, *a]`, ...) parse quickly into a structure that is exponentially
large when walked as a tree, which everything after parsing does (`copy.deepcopy`, Haystack's
`Pipeline.from_dict`): such a file stalled `load_pipeline` for 90 s. The loader below counts the nodes of the
composed document as if every alias were expanded (each shared node counted once per reference, computed in
time linear in the number of distinct nodes) and refuses the document over a bound, before anything walks it.
"""

from __future__ import annotations

from typing import Any

import yaml

from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError

# A pipeline YAML has a few hundred nodes (the shipped rag.yaml: ~150); a calibration reference pasted into it
# adds a few thousand. One million expanded nodes is far above any real pipeline and parses in well under a
# second.
MAX_EXPANDED_NODES = 1_000_000


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Number of nodes of `root` with every alias expanded; stops counting past `limit`."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    # Iterative post-order walk over the node graph (aliases make it a DAG, or a cycle for recursive anchors).
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not children_done:
            if key in visiting:
                msg = "the YAML refers to itself through an anchor (a recursive alias); refusing to load it"
                raise PipelineLoadError(msg)
            visiting.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        visiting.discard(key)
        total = 1
        for child in children:
            total += sizes[id(child)]
            if total > limit:
                msg = (
                    f"the YAML expands to more than {limit} nodes through its aliases (&anchor/*alias); "
                    "refusing to load it (a pipeline needs a few hundred; nested aliases like this are an alias "
                    "bomb)"
                )
                raise PipelineLoadError(msg)
        sizes[key] = total
    return sizes[id(root)]


class BoundedSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses documents whose alias expansion exceeds `max_expanded_nodes` nodes."""

    max_expanded_nodes = MAX_EXPANDED_NODES

    def compose_document(self) -> Any:
        """
        Compose one document and check its expanded size before it is constructed.

        :returns: The composed root node.
        :raises PipelineLoadError: When the document expands past the bound, or an alias refers to itself.
        """
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, self.max_expanded_nodes)
        return node


def load_yaml(text: str, *, max_expanded_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """
    Parse YAML text safely (no Python objects) with a bound on its alias-expanded size.

    :param text: The YAML text.
    :param max_expanded_nodes: The bound.
    :returns: The parsed data.
    :raises PipelineLoadError: On an alias bomb, a recursive alias, or invalid YAML.
    """
    loader_cls = type("_Loader", (BoundedSafeLoader,), {"max_expanded_nodes": max_expanded_nodes})
    try:
        return yaml.load(text, Loader=loader_cls)
    except yaml.YAMLError as e:
        msg = f"invalid YAML: {e}"
        raise PipelineLoadError(msg) from e
