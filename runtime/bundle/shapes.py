"""The shape language of the bundle contract: symbolic dims and their arithmetic.

A dim is an ``int`` or a string. A string is a symbol (``"T"``, ``"tQ"``) or an arithmetic
expression over symbols and integers with ``+ - *`` and ``/`` (exact integer division) or
``//`` (floor division), e.g. ``"tQ+5"``; strings carry no spaces. The stage symbols are
(DESIGN.md): segmenter ``T, Hp, Wp`` with ``h = Hp/4`` and ``w = Wp/4`` (:data:`DERIVED_DIMS`);
tracker ``h, w`` and ``tQ``; refiner ``L, Qr``; mask_head ``t, Qs, h, w``. The model
constants ``Q, C, D (mask_dim), K, N, S`` appear as numbers in a manifest (see
:func:`dvis_trt.runtime.bundle.stages.stage_specs`), as names only in the ``STAGE_SPECS`` template.
"""
from __future__ import annotations

import ast
import math
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence, Union

if TYPE_CHECKING:
    from .stages import TensorSpec

__all__ = ["Dim", "DERIVED_DIMS", "eval_dim", "shape_symbols", "with_derived_dims",
           "resolve_shape", "simplify_dim", "infer_dims", "num_elements"]

#: Symbols defined from others when the latter are known (segmenter: mask features at stride 4).
DERIVED_DIMS = {"h": "Hp/4", "w": "Wp/4"}

Dim = Union[int, str]


_ALLOWED_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)


def _parse_dim(expr: str) -> ast.expr:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"bad symbolic dim {expr!r}: not an arithmetic expression") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Name, ast.Load, ast.BinOp, *_ALLOWED_BINOPS)):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, int) \
                and not isinstance(node.value, bool):
            continue
        raise ValueError(f"bad symbolic dim {expr!r}: only symbols, integers and + - * / // "
                         "are allowed")
    return tree.body


def _eval_node(node: ast.expr, dims: Mapping[str, int], expr: str) -> int:
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        if node.id not in dims:
            raise KeyError(node.id)
        return int(dims[node.id])
    assert isinstance(node, ast.BinOp)
    a = _eval_node(node.left, dims, expr)
    b = _eval_node(node.right, dims, expr)
    if isinstance(node.op, ast.Add):
        return a + b
    if isinstance(node.op, ast.Sub):
        return a - b
    if isinstance(node.op, ast.Mult):
        return a * b
    if b == 0:
        raise ValueError(f"symbolic dim {expr!r} divides by zero")
    if isinstance(node.op, ast.FloorDiv):
        return a // b
    if a % b:
        raise ValueError(f"symbolic dim {expr!r}: {a} is not divisible by {b}")
    return a // b


def eval_dim(dim: Dim, dims: Mapping[str, int]) -> int:
    """Value of one dim given symbol values, e.g. ``eval_dim("tQ+5", {"tQ": 3}) == 8``.

    Raises ``KeyError(symbol)`` for an unbound symbol and ``ValueError`` for a malformed
    expression or an inexact ``/``.
    """
    if isinstance(dim, bool):
        raise ValueError(f"bad dim {dim!r}")
    if isinstance(dim, int):
        return dim
    return _eval_node(_parse_dim(dim), dims, dim)


def shape_symbols(shape: Sequence[Dim]) -> set[str]:
    """Every symbol name used in ``shape`` (``["tQ+5", 256] -> {"tQ"}``)."""
    out: set[str] = set()
    for d in shape:
        if isinstance(d, str):
            out |= {n.id for n in ast.walk(_parse_dim(d)) if isinstance(n, ast.Name)}
    return out


def with_derived_dims(dims: Mapping[str, int]) -> dict[str, int]:
    """``dims`` plus the :data:`DERIVED_DIMS` whose sources are bound (``Hp -> h = Hp/4``).

    Raises ``ValueError`` when a derived dim is given and disagrees with its source, or when
    ``Hp``/``Wp`` is not a multiple of 4.
    """
    out = dict(dims)
    for name, expr in DERIVED_DIMS.items():
        try:
            value = eval_dim(expr, out)
        except KeyError:
            continue
        if name in out and out[name] != value:
            raise ValueError(f"dim {name}={out[name]} disagrees with {name}={expr}={value}")
        out[name] = value
    return out


def resolve_shape(shape: Sequence[Dim], dims: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape from a symbolic one: ``resolve_shape(["T", 256, "h", "w"], {"T": 5,
    "Hp": 480, "Wp": 864}) == (5, 256, 120, 216)`` (derived dims are filled in).

    Raises ``ValueError`` naming the unbound symbol, or for a negative result.
    """
    full = with_derived_dims(dims)
    out = []
    for d in shape:
        try:
            v = eval_dim(d, full)
        except KeyError as exc:
            raise ValueError(f"shape {list(shape)}: symbol {exc.args[0]!r} has no value "
                             f"(given {sorted(full)})") from None
        if v < 0:
            raise ValueError(f"shape {list(shape)}: dim {d!r} evaluates to {v} < 0")
        out.append(v)
    return tuple(out)


def simplify_dim(dim: Dim, values: Mapping[str, int]) -> Dim:
    """Substitute the known ``values`` into ``dim`` and fold constants: ``simplify_dim("tQ+S",
    {"S": 5}) == "tQ+5"``, ``simplify_dim("K+1", {"K": 25}) == 26``. Unknown symbols stay."""
    if isinstance(dim, int):
        return dim

    def fold(node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Name) and node.id in values:
            return ast.Constant(int(values[node.id]))
        if isinstance(node, ast.BinOp):
            left, right = fold(node.left), fold(node.right)
            if isinstance(left, ast.Constant) and isinstance(right, ast.Constant):
                return ast.Constant(_eval_node(ast.BinOp(left, node.op, right), {}, dim))
            return ast.BinOp(left, node.op, right)
        return node

    folded = fold(_parse_dim(dim))
    if isinstance(folded, ast.Constant):
        return int(folded.value)
    return ast.unparse(folded).replace(" ", "")


def infer_dims(specs: Iterable["TensorSpec"], shapes: Mapping[str, Sequence[int]],
               known: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bind symbols from concrete shapes, then check every dim (expressions included).

    ``specs``: the stage's input TensorSpecs; ``shapes``: name -> concrete shape for each.
    Plain-symbol dims bind their symbol; integer and expression dims are checked once all
    plain symbols are bound. Returns every bound symbol plus :data:`DERIVED_DIMS`.
    Raises ``ValueError`` (one line: tensor, axis, expected, got) on any disagreement.
    """
    bound: dict[str, int] = dict(known or {})
    specs = list(specs)
    for spec in specs:
        shape = tuple(int(x) for x in shapes[spec.name])
        if len(shape) != len(spec.shape):
            raise ValueError(f"'{spec.name}': shape {shape} has rank {len(shape)}, expected "
                             f"{len(spec.shape)} {list(spec.shape)}")
        for axis, (d, got) in enumerate(zip(spec.shape, shape)):
            if isinstance(d, str) and d.isidentifier():
                if d in bound and bound[d] != got:
                    raise ValueError(f"'{spec.name}' dim {axis} ({d}) is {got} but {d} is "
                                     f"{bound[d]} elsewhere")
                bound[d] = got
    bound = with_derived_dims(bound)
    for spec in specs:
        shape = tuple(int(x) for x in shapes[spec.name])
        for axis, (d, got) in enumerate(zip(spec.shape, shape)):
            try:
                want = eval_dim(d, bound)
            except KeyError:
                continue  # an expression over a symbol bound nowhere: nothing to check
            if want != got:
                raise ValueError(f"'{spec.name}' dim {axis} is {got}, expected {d} = {want}")
    return bound


def num_elements(shape: Sequence[int]) -> int:
    """Product of a concrete shape (1 for a scalar)."""
    return math.prod(int(x) for x in shape)
