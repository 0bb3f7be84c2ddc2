"""The benchmarks' transformer: a KerasHub GPT-2 causal LM fed token ids.

No TensorFlow here: the accelerator machine's GPU check (`gpu_check.sh`)
runs this on JAX and PyTorch with only keras and keras-hub installed, and
KerasHub's tokenizers need TensorFlow, so the model takes token ids
(``preprocessor=None``) and the data is drawn, not tokenized.

Sizes (`SIZES`): ``full`` is 8.4M parameters, 8 layers of width 256 over
256-token sequences, large enough that activations, not weights, dominate a
batch's memory (at 64 sequences, the logits alone are 0.5 GB); ``quick`` is
a smoke test's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import keras_hub
import numpy as np


@dataclasses.dataclass(frozen=True)
class Size:
    vocabulary: int
    layers: int
    hidden: int
    heads: int
    intermediate: int
    sequence: int


SIZES = {
    "full": Size(8192, 8, 256, 4, 1024, 256),
    "quick": Size(512, 2, 32, 2, 64, 32),
}
LORA_RANK = 4
LEARNING_RATE = 1e-3


def causal_lm(size: Size, seed: int = 0, lora: bool = False) -> keras.Model:
    """A GPT-2 from config with random weights, the same for every ``seed``."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=size.vocabulary,
        num_layers=size.layers,
        num_heads=size.heads,
        hidden_dim=size.hidden,
        intermediate_dim=size.intermediate,
        max_sequence_length=size.sequence,
        dropout=0.0,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    if lora:
        lm.backbone.enable_lora(rank=LORA_RANK)
    return lm


def token_data(size: Size, sequences: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` for next-token prediction, as numpy arrays.

    Each sequence has a drawn length between half and all of
    ``size.sequence`` and is padded after it; the padding mask is the sample
    weight, so the loss (``mean_with_sample_weight``) averages over real
    tokens, as `GPT2CausalLMPreprocessor` would set it up.
    """
    rng = np.random.default_rng(seed)
    length = size.sequence + 1
    tokens = rng.integers(1, size.vocabulary, (sequences, length), dtype="int32")
    lengths = rng.integers(length // 2, length + 1, sequences)
    mask = np.arange(length)[None, :] < lengths[:, None]
    tokens = np.where(mask, tokens, 0).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": mask[:, :-1]}
    return x, tokens[:, 1:], mask[:, 1:].astype("float32")


def compiled(model: keras.Model, keras_accumulation: int | None = None) -> keras.Model:
    """Adam and the padded-token loss; Keras's built-in accumulation if asked."""
    model.compile(
        optimizer=keras.optimizers.Adam(
            LEARNING_RATE, gradient_accumulation_steps=keras_accumulation
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
    )
    return model


def parameter_count(model: keras.Model) -> tuple[int, int]:
    """``(all, trainable)`` parameters."""
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return model.count_params(), trainable
