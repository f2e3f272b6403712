"""Name -> factory registry for the memfit model zoo.

Every factory is a callable that takes keyword-only options and returns an
``nn.Module``. Factories are added with :func:`register_model` and built with
:func:`create`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

from ..errors import MemfitInputError

__all__ = ["SPEC_ATTR", "create", "list_models", "load", "register_model", "spec_of"]

# Models built by :func:`create` carry how they were built, so a saved file can rebuild the
# architecture from plain JSON instead of pickled code.
SPEC_ATTR = "memfit_spec"

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def _describe(factory: ModelFactory) -> str:
    module = getattr(factory, "__module__", "?")
    qualname = getattr(factory, "__qualname__", repr(factory))
    return f"{module}.{qualname}"


def _add(name: str, factory: ModelFactory) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"model factory for {name!r} must be callable, got {factory!r}")
    existing = _REGISTRY.get(name)
    if existing is not None:
        raise ValueError(
            f"model name {name!r} is already registered (by {_describe(existing)}); "
            f"refusing to register {_describe(factory)} under the same name"
        )
    _REGISTRY[name] = factory


@overload
def register_model(name: F, /) -> F: ...


@overload
def register_model(name: str | None = None, /) -> Callable[[F], F]: ...


def register_model(name: str | F | None = None, /) -> F | Callable[[F], F]:
    """Register a model factory under a name.

    Usable bare (``@register_model``, the function's ``__name__`` is used) or
    with an explicit name (``@register_model("resnet18")``). The decorated
    function is returned unchanged.

    Args:
        name: The registry name, or the factory itself when used bare. ``None``
            means "use the function's ``__name__``".

    Returns:
        The factory (bare use) or a decorator that registers its argument.

    Raises:
        ValueError: If the name is empty or already registered.
    """
    if callable(name):
        factory = name
        _add(factory.__name__, factory)
        return factory

    def decorator(factory: F) -> F:
        _add(factory.__name__ if name is None else name, factory)
        return factory

    return decorator


def list_models() -> list[str]:
    """Return the names of all registered models.

    Returns:
        The registered names, sorted alphabetically.
    """
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: The registered model name (see :func:`list_models`).
        **kwargs: Keyword-only options forwarded to the model's factory
            (e.g. ``num_classes=10, stem="cifar"``).

    Returns:
        A freshly initialised ``nn.Module``.

    Raises:
        ValueError: If ``name`` is not registered (the message lists close
            matches), or if the factory rejects an option value.
        TypeError: If the factory does not accept one of ``kwargs``.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        matches = difflib.get_close_matches(str(name), list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} "
            f"Call memfit.models.list_models() to see all {len(_REGISTRY)} registered names."
        )
    model = factory(**kwargs)
    setattr(model, SPEC_ATTR, {"name": name, "options": dict(kwargs)})
    return model


def load(spec: str, **options: Any) -> nn.Module:
    """Build the model a command line names: a zoo name or ``package.module:factory``.

    Args:
        spec: A registered name (``"resnet18"``) or a factory's import path
            (``"mypackage.nets:build_net"``).
        **options: Keyword options for the factory; those that are None are left to its defaults.

    A factory is an ``nn.Module`` class or a function that builds one; anything else (``os:system``,
    a builtin, a class of another kind, a function of the standard library) is refused uncalled.

    Raises:
        MemfitInputError: If the name is unknown, the factory cannot be imported, is not a model
            factory, refuses an option, fails, or builds something that is not an ``nn.Module``.

    Example:
        >>> import memfit
        >>> type(memfit.models.load("resnet18", num_classes=10, stem=None)).__name__
        'ResNet'
    """
    kwargs = {k: v for k, v in options.items() if v is not None}
    if ":" not in spec:
        try:
            return create(spec, **kwargs)
        except (ValueError, TypeError) as e:
            raise MemfitInputError(f"cannot build {spec} with {kwargs}: {e}") from e
    factory = _factory(spec)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        given = ", ".join(f"{k}=" for k in kwargs) or "no arguments"
        raise MemfitInputError(f"model '{spec}' cannot be called with {given}: {e}") from None
    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's own code: one line, not its traceback
        raise MemfitInputError(f"model '{spec}' failed to build: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise MemfitInputError(f"model '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _factory(spec: str) -> Callable[..., Any]:
    """What ``package.module:factory`` names, if it may be a model factory."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise MemfitInputError(f"cannot load '{spec}': {e}; expected package.module:factory") from e
    refused = (
        f"model '{spec}' names {getattr(factory, '__qualname__', type(factory).__name__)} ({type(factory).__name__})"
    )
    expected = "expected an nn.Module class or a function that returns one"
    if inspect.isclass(factory):
        if not issubclass(factory, nn.Module):
            raise MemfitInputError(f"{refused}, a class but not a torch.nn.Module; {expected}")
        return factory
    # a Python function outside the standard library: its annotation, where it has one, must agree
    if not inspect.isfunction(factory):
        raise MemfitInputError(f"{refused}: {expected}")
    if factory.__module__.partition(".")[0] in sys.stdlib_module_names:
        raise MemfitInputError(f"{refused}, from the standard library, not a model factory; {expected}")
    try:
        returns = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001  an annotation that does not resolve says nothing either way
        returns = None
    if inspect.isclass(returns) and not (issubclass(returns, nn.Module) or issubclass(nn.Module, returns)):
        raise MemfitInputError(f"model '{spec}' returns {returns.__name__}, not a torch.nn.Module; {expected}")
    return factory


def spec_of(model: nn.Module) -> dict[str, Any] | None:
    """How a zoo model was built (``{"name": ..., "options": {...}}``), or None if not by :func:`create`."""
    spec = getattr(model, SPEC_ATTR, None)
    return dict(spec) if isinstance(spec, dict) else None
