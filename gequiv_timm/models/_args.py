"""Constructor-argument checks shared by every family: out-of-range values are refused before anything is built.

One rule for all of them: an argument is checked against its allowed range and a bad value raises a one-line
``ValueError`` ``"<Owner>: <arg> must be <allowed range>, got <value>"``. Only ``None`` means "the default"
(``0`` is a value, and it is checked like any other). ``bool`` is not accepted where an int is expected.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional, Sequence, Tuple

__all__ = ['check_int', 'check_ints', 'check_indices', 'check_float', 'check_choice', 'check_common',
           'TIMM_RATES', 'check_timm_kwargs']


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _range(lo: Optional[int], hi: Optional[int]) -> str:
    if hi is None:
        return f'>= {lo}'
    return f'in [{lo}, {hi}]'


def check_int(owner: str, arg: str, value: Any, lo: int = 1, hi: Optional[int] = None, *, none_ok: bool = False,
              odd: bool = False, choices: Optional[Iterable[int]] = None, what: str = '') -> Optional[int]:
    """``value`` as an int in ``[lo, hi]`` (``hi=None``: no upper bound), odd when ``odd``, one of ``choices`` when
    given; ``None`` passes only with ``none_ok`` (it then means the default). ``what`` says what the number is."""
    if value is None and none_ok:
        return None
    allowed = (f"one of {tuple(choices)}" if choices is not None else
               f"{'an odd' if odd else 'an'} int {_range(lo, hi)}")
    if none_ok:
        allowed += ' or None' + ('' if 'None' in what else ' (the default)')
    ok = _is_int(value) and value >= lo and (hi is None or value <= hi) and (not odd or value % 2 == 1) and \
        (choices is None or value in tuple(choices))
    if not ok:
        raise ValueError(f"{owner}: {arg} must be {allowed}{f' ({what})' if what else ''}, got {value!r}")
    return int(value)


def check_ints(owner: str, arg: str, values: Any, lo: int = 1, hi: Optional[int] = None, *,
               length: Optional[int] = None, min_len: int = 1, what: str = '') -> Tuple[int, ...]:
    """``values`` as a tuple of ints in ``[lo, hi]`` (``length`` of them when given, else at least ``min_len``)."""
    n = f'{length} ' if length is not None else (f'at least {min_len} ' if min_len > 0 else '')
    allowed = f"a sequence of {n}ints {_range(lo, hi)}{f' ({what})' if what else ''}"
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{owner}: {arg} must be {allowed}, got {values!r}")
    vals = tuple(values)
    if (length is not None and len(vals) != length) or len(vals) < min_len or \
            not all(_is_int(v) and v >= lo and (hi is None or v <= hi) for v in vals):
        raise ValueError(f"{owner}: {arg} must be {allowed}, got {values!r}")
    return tuple(int(v) for v in vals)


def check_indices(owner: str, arg: str, values: Any, n: int, what: str) -> Tuple[int, ...]:
    """Indices into ``n`` things (e.g. stages): each an int in ``[0, n - 1]``; an empty sequence is allowed."""
    return check_ints(owner, arg, values, 0, n - 1, min_len=0, what=what)


def check_float(owner: str, arg: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *,
                lo_open: bool = False, hi_open: bool = False, what: str = '') -> float:
    """``value`` as a finite float in the interval given by ``lo`` / ``hi`` (open ends with ``lo_open`` /
    ``hi_open``; ``None``: unbounded)."""
    left = '(' if lo_open or lo is None else '['
    right = ')' if hi_open or hi is None else ']'
    allowed = f"a finite number in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and lo is not None:
        ok = float(value) > lo if lo_open else float(value) >= lo
    if ok and hi is not None:
        ok = float(value) < hi if hi_open else float(value) <= hi
    if not ok:
        raise ValueError(f"{owner}: {arg} must be {allowed}{f' ({what})' if what else ''}, got {value!r}")
    return float(value)


def check_choice(owner: str, arg: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` when it is one of ``choices``."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{owner}: {arg} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_common(owner: str, num_classes: Any, in_chans: Any, drop_rate: Any) -> None:
    """The arguments every timm model takes: ``num_classes >= 0`` (0: no classifier), ``in_chans >= 1``,
    ``drop_rate`` in ``[0, 1)``."""
    check_int(owner, 'num_classes', num_classes, 0, what='0 = no classifier')
    check_int(owner, 'in_chans', in_chans, 1)
    check_float(owner, 'drop_rate', drop_rate, 0.0, 1.0, hi_open=True)


# timm's regularisation rates (dropout before the classifier, stochastic depth, DropBlock): probabilities in [0, 1)
TIMM_RATES = ('drop_rate', 'drop_path_rate', 'drop_block_rate')


def check_timm_kwargs(owner: str, kwargs: Any, where: str = '', rates: Sequence[str] = ('drop_rate',)) -> None:
    """The arguments every timm model takes, as far as ``kwargs`` (on their way to a constructor) give them:
    ``num_classes >= 0``, ``in_chans >= 1`` and each rate of ``rates`` in ``[0, 1)`` (every model takes
    ``drop_rate``; a family that passes its arguments on to a timm backbone also takes that backbone's
    ``drop_path_rate`` / ``drop_block_rate``: ``rates=TIMM_RATES``). An absent key or ``None`` is the model's
    default. ``where`` names the dict the keys sit in (``'backbone_kwargs'`` -> ``backbone_kwargs['drop_rate']``).
    Every registered model's build starts here (:func:`~gequiv_timm.models._helpers.create_gequiv_model`), so a
    family whose own constructor never sees these values (a timm backbone behind a new stem) is covered too."""
    if not isinstance(kwargs, dict):
        return

    def name(key: str) -> str:
        return f'{where}[{key!r}]' if where else key
    if kwargs.get('num_classes') is not None:
        check_int(owner, name('num_classes'), kwargs['num_classes'], 0, what='0 = no classifier')
    if kwargs.get('in_chans') is not None:
        check_int(owner, name('in_chans'), kwargs['in_chans'], 1)
    for key in rates:
        if kwargs.get(key) is not None:
            check_float(owner, name(key), kwargs[key], 0.0, 1.0, hi_open=True)
