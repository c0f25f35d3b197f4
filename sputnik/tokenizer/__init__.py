"""Tokenizers for sputnik models.

One `Tokenizer` class covers both places a model's tokenizer can live:

* a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`), and
* a GGUF file, whose metadata describes the vocabulary the way llama.cpp reads it.

Either way the result is a `tokenizers.Tokenizer` plus the few facts around it (BOS/EOS, chat
template, stop tokens). Chat templates are rendered the way transformers renders them, so a prompt
built here is byte-for-byte the prompt transformers would build. `StreamDecoder` turns generated ids
into text one token at a time without ever emitting half a character.

Modules: tokenizer (the class), chat_template (rendering), stream (StreamDecoder), gguf (a GGUF file's
vocabulary), backends (BPE backends built from a bare vocabulary), pretokenize (llama.cpp's split regexes).
R1's own format (special tokens, chat template) is in sputnik.r1.
"""

from sputnik.tokenizer.chat_template import render_chat_template
from sputnik.tokenizer.stream import StreamDecoder
from sputnik.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "render_chat_template"]
