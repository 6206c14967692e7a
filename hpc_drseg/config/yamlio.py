"""Strict YAML reading for every file the package reads: safe types only, no anchors or aliases (a few hundred bytes of
nested aliases expand to gigabytes), no duplicate keys (YAML would silently keep the last). Standard library + PyYAML.
"""

from __future__ import annotations

from typing import Any

import yaml

from hpc_drseg.config.checks import ConfigError


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigError(
                f"{self.name}, line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not accepted; "
                "write the values out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{self.name}, line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping; "
                    "keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Parses `text` (named `source` in errors); ConfigError for invalid YAML, anchors, aliases, duplicate keys."""
    loader = _StrictLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({problem})") from exc
    finally:
        loader.dispose()
