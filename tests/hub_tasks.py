"""Tiny KerasHub tasks built from config (random weights, in-memory vocabularies).

No preset can be downloaded here, so each task is built from its classes:
a GPT-2 causal LM whose byte-level BPE vocabulary is the printable ASCII
characters and a few merges, and a BERT classifier with a word-piece
vocabulary of a few words. Both pad to a fixed sequence length, so a
concatenated window of raw strings preprocesses to the concatenated
micro-batches: the big batch a plain task's step is the oracle on.
"""

from __future__ import annotations

import keras
import keras_hub

SEQUENCE_LENGTH = 16
# One layer, width 16, no dropout: the same for both tasks.
BACKBONE = {
    "num_layers": 1,
    "num_heads": 2,
    "hidden_dim": 16,
    "intermediate_dim": 32,
    "max_sequence_length": SEQUENCE_LENGTH,
    "dropout": 0.0,
}

TEXTS = [
    "the cat sat",
    "a dog ran far away",
    "hi",
    "the end of the story is near",
    "we went home",
    "this is the way",
    "ok",
    "they saw the sea at dawn",
    "one two three",
    "then the rain",
    "hello there",
    "the theme",
]
# Mostly one class: at random initialisation a balanced batch's classifier
# gradient nearly cancels, and then float32 summation order alone moves a
# plain step by 4e-5 of its size (measured by permuting the batch); here 2e-7.
LABELS = [1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0]


def causal_lm(seed: int = 0) -> keras_hub.models.GPT2CausalLM:
    keras.utils.set_random_seed(seed)
    characters = [chr(code) for code in range(33, 127)] + ["Ġ"]
    merges = ["t h", "h e", "Ġ t", "Ġt he"]
    pieces = [*characters, "th", "he", "Ġt", "Ġthe"]
    vocabulary = {"<|endoftext|>": 0, **{p: i + 1 for i, p in enumerate(pieces)}}
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocabulary), **BACKBONE
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


def text_classifier(seed: int = 0) -> keras_hub.models.BertTextClassifier:
    keras.utils.set_random_seed(seed)
    words = sorted({word for text in TEXTS for word in text.split()})
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), **BACKBONE
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, preprocessor=preprocessor, num_classes=2, dropout=0.0
    )


TASKS = {"causal_lm": causal_lm, "text_classifier": text_classifier}
