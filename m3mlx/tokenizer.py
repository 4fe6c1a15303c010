"""M3's tokenizer: `tokenizer.json` through `tokenizers`, special tokens kept as single tokens."""

from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from .chat_format import read_chat_template
from .checkpoint import read_json
from .errors import CheckpointError
from .tokens import END_OF_TURN


class Tokenizer:
    def __init__(self, tokenizer, eos_token_ids: Iterable[int] = (), chat_template=None,
                 chat_template_file: Optional[str] = None):
        self._tok = tokenizer
        eos = list(eos_token_ids)
        end = tokenizer.token_to_id(END_OF_TURN)
        if end is not None and end not in eos:
            eos.append(end)
        self.eos_token_ids = eos
        self.chat_template = chat_template  # a template, a {name: template} dict, or None
        self.chat_template_file = chat_template_file  # where it came from, for messages

    @classmethod
    def from_dir(cls, path, eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """tokenizer.json (and tokenizer_config.json when present) of a model directory, and
        its chat template; CheckpointError when a file cannot be read, TemplateError when the
        template does not compile."""
        path = Path(path)
        tokenizer, _ = read_tokenizer_files(path)  # tokenizer_config.json is checked here
        template = read_chat_template(path)
        origin = next((path / n for n in ("chat_template.jinja", "chat_template.json",
                                          "tokenizer_config.json") if (path / n).exists()), None)
        return cls(tokenizer, eos_token_ids, template,
                   str(origin) if template is not None else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        """Token ids; special-token strings in the text become their single ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


def read_tokenizer_files(path: Path) -> Tuple[object, dict]:
    """(tokenizer.json parsed by `tokenizers`, tokenizer_config.json or {}); CheckpointError
    when either cannot be read."""
    config = path / "tokenizer_config.json"
    settings = read_json(config) if config.exists() else {}
    return _read_tokenizer(path / "tokenizer.json"), settings


def _read_tokenizer(file: Path):
    from tokenizers import Tokenizer as HFTokenizer

    if not file.is_file():
        raise CheckpointError(f"{file.parent} has no tokenizer.json; copy it from the original "
                              "checkpoint")
    try:
        return HFTokenizer.from_file(str(file))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # `tokenizers` raises bare Exceptions, and Rust panics
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{file} is not a tokenizer the `tokenizers` library can read "
                              f"({reason}); copy it from the original checkpoint") from None


class StreamingDetokenizer:
    """Turns tokens into text pieces as they come, holding back unfinished UTF-8 characters.

    Byte-level BPE decodes a token run independently once it ends on a whole character, so
    only the pending run is decoded at each step.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending: List[int] = []

    def add(self, token: int) -> str:
        """Add a token; return the text it completes (may be empty)."""
        self._pending.append(token)
        text = self._tokenizer.decode(self._pending)
        if text.endswith("\ufffd"):
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """Whatever is pending, finished or not."""
        text = self._tokenizer.decode(self._pending)
        self._pending = []
        return text
