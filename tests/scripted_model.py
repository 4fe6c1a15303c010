"""The tiny model with its output scripted: known M3 replies through the real generation path.

`Scripted(model, tokenizer, {NAME: reply text})`: when the part of a prompt the model is fed
(what follows the cached prefix) contains `[script:NAME]`, the model emits the tokens of that
reply, then the end-of-turn token. The model still runs on every token (its caches fill as
usual); only the last position's logits are replaced.
"""

import re

import mlx.core as mx

MARKER = re.compile(r"\[script:([\w-]+)\]")


class Scripted:
    """The model, with the logits of its last position forced to a scripted reply."""

    def __init__(self, model, tokenizer, scripts):
        self.model, self.args, self.layers = model, model.args, model.layers
        self.tokenizer = tokenizer
        self.scripts = {name: tokenizer.encode(text) + [tokenizer.eos_token_ids[0]]
                        for name, text in scripts.items()}
        self.reply, self.position, self.forced = None, 0, None
        self.cache, self.end = None, None  # the cache fed last, and where it then ended
        self.tail = []  # the last tokens fed

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hidden(self, inputs, cache=None):
        """An earlier prefill chunk: it goes through the script's bookkeeping like any call
        (prefill only evaluates what comes back)."""
        return self(inputs, cache)

    def __call__(self, inputs, cache=None, last_only=False):
        continuing = cache is self.cache and cache[0].offset == self.end
        logits = self.model(inputs, cache=cache, last_only=last_only)
        self.cache, self.end = cache, cache[0].offset
        fed = inputs.reshape(-1).tolist()
        # A prefill chunk's boundary may cut a marker: look at the end of the last chunk too.
        window = (self.tail if continuing else []) + fed
        self.tail = window[-32:]
        found = MARKER.findall(self.tokenizer.decode(window))
        if not continuing or (len(fed) > 1 and found):  # a new prompt, or more of one
            self.reply = self.scripts.get(found[-1]) if found else \
                (self.reply if continuing else None)
            self.position = 0
        elif len(fed) == 1 and fed[0] == self.forced:  # the scripted token just sampled
            self.position += 1
        if self.reply is None or self.position >= len(self.reply):
            self.forced = None
            return logits
        self.forced = self.reply[self.position]
        vocab = logits.shape[-1]
        last = mx.where(mx.arange(vocab) == self.forced, 0.0, -1e9).astype(logits.dtype)
        return mx.concatenate([logits[:, :-1], last[None, None]], axis=1)
