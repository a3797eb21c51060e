"""Validation of the layer's options: a bad value is a ValueError naming the option and what it
allows; a misspelt option lists the valid ones (not Python's TypeError from inside mmcv)."""
import inspect
import numbers


def check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f'CBN option `{name}` must be an integer >= {low}, got {value!r}')
    return int(value)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f'CBN option `{name}` must be True or False, got {value!r}')
    return value


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f'CBN option `eps` must be a float > 0, got {eps!r}')
    return float(eps)


def check_momentum(momentum):
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
                                 or not 0.0 <= momentum <= 1.0):
        raise ValueError(f'CBN option `momentum` must be None or a float in [0, 1], got {momentum!r}')
    return momentum


def reject_unknown(cls, unknown: dict) -> None:
    """``unknown``: keyword arguments ``cls.__init__`` collected in ``**unknown``."""
    if unknown:
        valid = [p for p in inspect.signature(cls.__init__).parameters
                 if p not in ('self', 'unknown', 'num_features')]
        raise ValueError(f'{cls.__name__}: unknown option(s) {sorted(unknown)}; valid options: '
                         f'{", ".join(valid)} (and `requires_grad` in an mmcv norm_cfg)')
