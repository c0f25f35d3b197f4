"""Fill-in-the-middle prompts: the FIM special tokens a vocabulary may have, and the prompt each family expects."""

from __future__ import annotations

from dataclasses import dataclass

from sputnik.serve.protocol import APIError


@dataclass(frozen=True)
class FimStyle:
    """One family's FIM tokens, in prefix-suffix-middle order: `prefix` PROMPT `suffix` SUFFIX `middle` → the middle."""

    name: str
    prefix: str
    suffix: str
    middle: str


# The families whose vocabularies carry FIM tokens (the bars and spaces in DeepSeek's are U+FF5C and U+2581).
FIM_STYLES = (
    FimStyle("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    FimStyle("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    FimStyle("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
)


def fim_style(tokenizer) -> FimStyle | None:
    """The FIM tokens this tokenizer has as single tokens, if any."""
    for style in FIM_STYLES:
        if all(tokenizer.token_to_id(t) is not None for t in (style.prefix, style.suffix, style.middle)):
            return style
    return None


def fim_prompt(tokenizer, prompt: str, suffix: str) -> str:
    """The text that asks a FIM model for what goes between prompt and suffix; a 400 for a vocabulary without
    FIM tokens."""
    style = fim_style(tokenizer)
    if style is None:
        names = ", ".join(f"{s.name} ({s.prefix} {s.suffix} {s.middle})" for s in FIM_STYLES)
        raise APIError(400, f"this model's vocabulary has no fill-in-the-middle tokens, so `suffix` cannot be "
                            f"used; FIM needs one of: {names}", param="suffix", code="fim_not_supported")
    return f"{style.prefix}{prompt}{style.suffix}{suffix}{style.middle}"
