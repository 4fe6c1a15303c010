"""Request bodies of the OpenAI and Anthropic APIs, as pydantic models.

They check types and ranges (a wrong type, NaN, a negative count, an unknown enum value is an
error naming the field); the contents of messages and tools are then checked when they are
turned into a prompt (`requests`). Unknown fields are accepted and ignored, as the real APIs
do for fields a server does not implement.
"""

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Json = Dict[str, Any]
Probability = Field(default=None, ge=0, le=1)
Temperature = Field(default=None, ge=0, le=2)
Count = Field(default=None, ge=1)
Seed = Field(default=None, ge=0, lt=2**63)
TopLogprobs = Field(default=None, ge=0, le=20)


class Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False,
                              str_max_length=1 << 30)


class Sampling(Request):
    """Sampling fields every endpoint takes (top_k, min_p and repetition_penalty are
    extensions of the OpenAI API that local servers commonly accept)."""

    temperature: Optional[float] = Temperature
    top_p: Optional[float] = Probability
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, lt=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0, le=10)
    seed: Optional[int] = Seed


class StreamOptions(Request):
    include_usage: bool = False


# -- OpenAI Chat Completions ---------------------------------------------------------------------


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, List[Json], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[Json]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None


class ChatCompletionRequest(Sampling):
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Count
    max_completion_tokens: Optional[int] = Count
    stop: Union[str, List[str], None] = None
    tools: Optional[List[Json]] = None
    tool_choice: Union[Literal["auto", "none", "required"], Json, None] = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: Optional[int] = TopLogprobs
    n: int = Field(default=1, ge=1, le=1)
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    chat_template_kwargs: Optional[Json] = None


# -- OpenAI Completions ----------------------------------------------------------------------------


class CompletionRequest(Sampling):
    model: str
    prompt: Union[str, List[str], List[int]]
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=16, ge=1)
    stop: Union[str, List[str], None] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    echo: bool = False
    n: int = Field(default=1, ge=1, le=1)


# -- OpenAI Responses ------------------------------------------------------------------------------


class Reasoning(Request):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None


class ResponsesRequest(Sampling):
    model: str
    input: Union[str, List[Json]]
    instructions: Optional[str] = None
    stream: bool = False
    max_output_tokens: Optional[int] = Count
    tools: Optional[List[Json]] = None
    tool_choice: Union[Literal["auto", "none", "required"], Json, None] = None
    parallel_tool_calls: bool = True
    reasoning: Optional[Reasoning] = None
    previous_response_id: Optional[str] = None
    top_logprobs: Optional[int] = TopLogprobs


# -- Anthropic Messages ----------------------------------------------------------------------------


class AnthropicMessage(Request):
    role: Literal["user", "assistant", "system"]  # Claude Code sends system messages too
    content: Union[str, List[Json]]


class Thinking(Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = Field(default=None, ge=0)


class MessagesRequest(Request):
    model: str
    messages: List[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: Union[str, List[Json], None] = None
    stream: bool = False
    stop_sequences: Optional[List[str]] = None
    temperature: Optional[float] = Probability
    top_p: Optional[float] = Probability
    top_k: Optional[int] = Field(default=None, ge=0)
    tools: Optional[List[Json]] = None
    tool_choice: Optional[Json] = None
    thinking: Optional[Thinking] = None
    metadata: Optional[Json] = None


class CountTokensRequest(Request):
    model: str
    messages: List[AnthropicMessage] = Field(min_length=1)
    system: Union[str, List[Json], None] = None
    tools: Optional[List[Json]] = None
    tool_choice: Optional[Json] = None
    thinking: Optional[Thinking] = None
