"""Mapping rules: YAML files that say how a Fluent Bit record becomes a CloudTrail event.

``compiler`` validates YAML (with file:line: field messages) and emits the data-only Lua file
the filter loads; ``runner`` runs that data in the real Lua mapper (``fluent-bit/lua/cloudtrail/
mapper.lua``) for ``cloudtrail-sink mappings test|check``. The language: ``docs/mappings.md``.
"""

from .compiler import CompileError, Compiled, Example, compile_files
from .runner import LuaMapper, MapResult, MapperLoadError, check_examples, check_patterns

__all__ = ["CompileError", "Compiled", "Example", "compile_files", "LuaMapper", "MapResult",
           "MapperLoadError", "check_examples", "check_patterns"]
