"""Read back the printed form of patterns and specs, without executing anything.

Every IR object prints as the Python that builds it; `parse_repr` rebuilds it from that
text by walking its syntax tree and allowing only the IR's constructors, literals,
`range`, `slice`, `|` and `&`. Build manifests store specs this way, and `torch.compile`
hands a Spec built inside a compiled function over as its repr.
"""
from __future__ import annotations

import ast

from .patterns import PATTERN_TYPES, Pattern
from .spec import Spec

_CALLABLES = {**PATTERN_TYPES, "Spec": Spec, "range": range, "slice": slice}


def _value(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, bool, str, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    if isinstance(node, ast.Tuple):
        return tuple(_value(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
        a, b = _value(node.left), _value(node.right)
        return a | b if isinstance(node.op, ast.BitOr) else a & b
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLABLES:
        return _CALLABLES[node.func.id](*(_value(a) for a in node.args),
                                        **{k.arg: _value(k.value) for k in node.keywords if k.arg is not None})
    raise ValueError(f"not part of a pattern's printed form: {ast.unparse(node)[:80]!r}")


def parse_repr(text: str) -> Pattern | Spec:
    """The pattern or Spec whose repr is `text`; ValueError where `text` is not exactly such a repr."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    try:
        obj = _value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"cannot read {text[:200]!r} as a patterngen pattern or Spec: {exc}") from None
    if not isinstance(obj, (Pattern, Spec)) or repr(obj) != text:
        raise ValueError(f"{text[:200]!r} is not the printed form of a patterngen pattern or Spec of this version")
    return obj
