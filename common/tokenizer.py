"""The model's own tokenizer and chat template, loaded from its directory."""

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` under the model's chat template, ready for the reply."""
    if not tokenizer.chat_template:
        raise ValueError("this model's tokenizer has no chat template; use completions instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
