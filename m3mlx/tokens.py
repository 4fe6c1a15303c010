"""M3's special token strings: protocol constants the model was trained on (m3-model.md 5.1).

The one home of these strings: the chat format, the reply parser, the tokenizer wrapper and the
tiny checkpoints the demo and the tests write all take them from here.
"""

BOD = "]~!b["  # beginning of document, the tokenizer's bos_token
ROLE = "]~b]"  # opens a turn: ROLE + role name + "\n"
END_OF_TURN = "[e~["  # ends a turn; the tokenizer's eos_token, id 200020 in the release
UNK = "]!d~["
PAD = "]!p~["
NS = "]<]minimax[>["  # namespace prefix of every tool-call tag
THINK_BEGIN = "<mm:think>"
THINK_END = "</mm:think>"
TOOL_CALL_BEGIN = NS + "<tool_call>"
TOOL_CALL_END = NS + "</tool_call>"
IMAGE = "]<]image[>["
VIDEO = "]<]video[>["
IMAGE_START = "]<]start of image[>["
IMAGE_END = "]<]end of image[>["

# Strings that must stay single tokens (a tokenizer made for M3 carries them as special tokens).
SPECIAL_TOKENS = (BOD, ROLE, END_OF_TURN, UNK, PAD, THINK_BEGIN, THINK_END, NS, IMAGE, VIDEO,
                  IMAGE_START, IMAGE_END)

# The special-token variables Hugging Face hands to chat templates (tokenizer_config.json).
SPECIAL_TOKENS_MAP = {"bos_token": BOD, "eos_token": END_OF_TURN, "unk_token": UNK,
                      "pad_token": PAD}
