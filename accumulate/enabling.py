"""`enable_accumulation`: an existing Keras model made to accumulate, as it is.

How: the model's instance is given a subclass of its own class and of
`AccumulatingModel`, made once per class. The instance keeps everything it
has (weights, preprocessor, compiled state) and its class's every method
(``generate``, ``compute_loss``, KerasHub's preprocessing ``fit``), since
the subclass only adds `AccumulatingModel`'s train step and state in front
of them; ``isinstance(model, ItsClass)`` stays true.

Why not construct the subclass: a class that builds itself from inputs and
outputs (every functional model, every KerasHub task) makes Keras rewrite
the bases of every class above the one being constructed, for the process
(``inject_functional_model_class``), and `AccumulatingModel` would be one of
them. So nothing here calls Keras's model constructor on the subclass: the
subclass's ``__new__`` constructs the original class and enables that, and
loading rebuilds the original class from its config, then enables it.

Saving: every generated class saves under one registered name,
``accumulate>EnabledModel``, with the original class named in its config,
so a ``.keras`` file loads in any process that imported `accumulate.enabling`
(``from accumulate import enable_accumulation``), whichever class it holds.

Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model = enable_accumulation(model, accumulation_steps=4)
    >>> isinstance(model, keras.Sequential), model.accumulation_steps
    (True, 4)
"""

from __future__ import annotations

from typing import Any

import keras
from keras.src.saving import object_registration

from accumulate.model import (
    AccumulatingModel,
    _model_being_cloned,
    _refuse_keras_accumulation,
)
from accumulate.options import OPTIONS

# The name every generated class saves under, and the key of the original
# class in the saved config.
_REGISTERED_NAME = "accumulate>EnabledModel"
_ORIGINAL_CLASS_KEY = "enabled_from"
_ACCUMULATING_CLASSES: dict[type, type] = {}


def enable_accumulation(
    model: keras.Model,
    accumulation_steps: int | str | dict[int, int | str] = 1,
    flush_at_epoch_end: bool = True,
    measure_noise_scale: bool = False,
    accumulation_dtype: str = "float32",
    micro_batch_size: int | str | None = None,
) -> keras.Model:
    """Makes ``model`` accumulate gradients exactly; returns the same object.

    ``model`` is any `keras.Model`: Sequential, functional, a subclass, a
    KerasHub task (``keras_hub.models.GPT2CausalLM.from_preset(...)``), a
    model from `keras.models.load_model`. It stays an instance of its class
    and keeps its methods, preprocessor, weights and compiled state, and it
    becomes an `AccumulatingModel`: the options below are that class's, as
    are its properties, `~AccumulatingModel.set_accumulation_steps`, apply
    and reset, and every guarantee. Each window's update is the big batch's
    under the compiled loss's reduction (see
    `~AccumulatingModel.micro_batch_weight`). A ``.keras`` file of it loads
    as its class again, accumulating, with a pending window. Its files hold
    the window's state beside the weights: a plain model of the class loads
    them with ``load_weights(path, skip_mismatch=True)``.

    Args:
        model: the model; not already accumulating, and not of a class that
            overrides ``train_step`` (accumulation is a train step).
        accumulation_steps, flush_at_epoch_end, measure_noise_scale,
            accumulation_dtype, micro_batch_size: as for `AccumulatingModel`.

    Example:
        >>> import keras, numpy as np
        >>> inputs = keras.Input((4,))
        >>> model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
        >>> model = enable_accumulation(model, accumulation_steps=4)
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x, y = np.ones((64, 4)), np.zeros((64, 1))
        >>> history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        >>> int(model.optimizer.iterations)  # 8 micro-batches, 2 updates
        2
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "enable_accumulation() takes a keras.Model; received "
            f"model={model!r} of type {type(model).__name__}."
        )
    if isinstance(model, AccumulatingModel):
        raise ValueError(
            f"The model {model.name!r} already accumulates (accumulation_steps="
            f"{model.accumulation_steps!r}). To change its window, call "
            "model.set_accumulation_steps(...)."
        )
    original = type(model)
    if original.train_step is not keras.Model.train_step:
        raise TypeError(
            f"{original.__name__} overrides train_step, and accumulation is a "
            "train step of its own, so that logic would be lost. Put it in "
            "compute_loss (kept as it is), or write the model as a subclass of "
            "AccumulatingModel whose train_step calls super().train_step."
        )
    if getattr(model, "optimizer", None) is not None:
        _refuse_keras_accumulation(model.optimizer)
    # object.__setattr__: Keras's (and KerasHub's) __setattr__ track values.
    object.__setattr__(model, "__class__", accumulating_class(original))
    try:
        model._init_accumulation(
            accumulation_steps,
            flush_at_epoch_end,
            measure_noise_scale,
            accumulation_dtype,
            micro_batch_size,
        )
    except Exception:
        object.__setattr__(model, "__class__", original)
        raise
    # A train function made before traced the plain step.
    model.train_function = None
    return model


def accumulating_class(original: type) -> type:
    """The subclass of ``original`` and `AccumulatingModel` (one per class)."""
    if original not in _ACCUMULATING_CLASSES:
        namespace = {
            "__module__": __name__,
            "__qualname__": original.__qualname__,
            "__doc__": (
                f"{original.__name__}, accumulating gradients "
                "(accumulate.enable_accumulation)."
            ),
            "_enabled_from": original,
            "__new__": _construct,
            "__init__": _constructed,
            "get_config": _get_config,
            "from_config": classmethod(_from_config),
            "__reduce__": _reduce,
        }
        subclass = type(original.__name__, (AccumulatingModel, original), namespace)
        # One registered name for every such class (Keras's public
        # registration refuses to give a name twice): _EnabledModel below
        # loads them all.
        object_registration.GLOBAL_CUSTOM_NAMES[subclass] = _REGISTERED_NAME
        _ACCUMULATING_CLASSES[original] = subclass
    return _ACCUMULATING_CLASSES[original]


def _construct(cls: type, *args: Any, **kwargs: Any) -> keras.Model:
    """``EnabledClass(...)``: the original class constructed, then enabled.

    This is how Keras's own ``cls(**config)`` (KerasHub's ``from_config``)
    and ``clone_model`` build one; the accumulation options are taken from
    the keywords, else from the model being cloned.
    """
    options = {name: kwargs.pop(name) for name in OPTIONS if name in kwargs}
    cloned = _model_being_cloned()
    if cloned is not None and not options:
        options = _options_of(cloned)
    return enable_accumulation(cls._enabled_from(*args, **kwargs), **options)


def _constructed(self: Any, *args: Any, **kwargs: Any) -> None:
    """Nothing: ``__new__`` returned a model already constructed and enabled."""


def _options_of(model: AccumulatingModel) -> dict[str, Any]:
    return {
        "accumulation_steps": model.accumulation_steps,
        "flush_at_epoch_end": model.flush_at_epoch_end,
        "measure_noise_scale": model.measure_noise_scale,
        "accumulation_dtype": model.accumulation_dtype,
        "micro_batch_size": model.micro_batch_size,
    }


def _get_config(self: Any) -> dict[str, Any]:
    config = AccumulatingModel.get_config(self)
    original = type(self)._enabled_from
    config[_ORIGINAL_CLASS_KEY] = {
        "module": original.__module__,
        "class_name": original.__name__,
        "registered_name": keras.saving.get_registered_name(original),
    }
    return config


def _from_config(cls: type, config: dict[str, Any], custom_objects: Any = None):
    del cls
    return _rebuild(config, custom_objects)


def _rebuild(config: dict[str, Any], custom_objects: Any = None) -> keras.Model:
    """The original class built from its config by Keras, then enabled."""
    config = dict(config)
    options = {name: config.pop(name) for name in OPTIONS if name in config}
    original = config.pop(_ORIGINAL_CLASS_KEY)
    # A generated class has its original's name, and Keras's clone_model puts
    # the model's class in scope by name: the original must answer to it.
    originals = {
        name: cls
        for cls in _ACCUMULATING_CLASSES
        if (cls.__module__, cls.__name__)
        == (original["module"], original["class_name"])
        for name in {cls.__name__, keras.saving.get_registered_name(cls)}
    }
    with keras.saving.custom_object_scope(originals):
        model = keras.saving.deserialize_keras_object(
            {**original, "config": config}, custom_objects=custom_objects
        )
    return enable_accumulation(model, **options)


def _reduce(self: Any) -> tuple:
    # Keras pickles a model as its .keras bytes and a loader bound to the
    # model's class, which pickle cannot find by name for a generated one.
    _, arguments = keras.Model.__reduce__(self)
    return _unpickle, arguments


def _unpickle(buffer: Any) -> keras.Model:
    """Loads a pickled accumulating model: its .keras bytes (see `_reduce`)."""
    return keras.Model._unpickle_model(buffer)


class _EnabledModel:
    """What ``accumulate>EnabledModel`` names in a saved file: its loader."""

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None):
        return _rebuild(config, custom_objects)


# Keras's documented way to add a custom object by name.
keras.saving.get_custom_objects()[_REGISTERED_NAME] = _EnabledModel
