"""A chat's prompt token ids, with a client's text kept out of the control tokens.

Invariant: every special id in ``chat_ids``'s answer was written by the template (``render_chat_pieces``'
Control tokens) or by an image's placeholder; text between them, content above all, is encoded with
special-token strings as plain text. For a chat whose text holds no special-token string the ids are exactly
``tokenizer.encode(image_prompts.expand(render_chat(...), grids))``: a tokenizer cuts its input at special
tokens and encodes each run between them on its own, and the runs here are the same runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from herd.model.chat_template import ChatMessage, Control, render_chat_pieces
from herd.model.image_processor import TileGrid, image_prompt
from herd.model.image_prompts import ImagePrompts
from herd.model.special_tokens import IMAGE
from herd.model.tokenizer import Tokenizer
from herd.model.tool_calls import FunctionTool


def chat_ids(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage | Mapping[str, Any]],
    *,
    tools: Sequence[FunctionTool | Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    image_prompts: ImagePrompts | None = None,
    grids: Sequence[TileGrid] = (),
    add_generation_prompt: bool = True,
) -> list[int]:
    """The prompt ids of ``messages`` (``render_chat``'s arguments; ``tool_choice`` None is "auto").

    Image part i becomes image i's placeholder tokens for ``grids[i]`` (the checkpoint's ``image_prompts``).
    ``<|image|>`` or any other special-token string typed in text stays text.

    Raises:
        ValueError: what ``render_chat`` refuses; image parts without ``image_prompts`` or not one grid each.
    """
    pieces = render_chat_pieces(messages, tools=tools, tool_choice=tool_choice or "auto",
                                add_generation_prompt=add_generation_prompt)
    images = sum(1 for p in pieces if p == Control(IMAGE))
    if images != len(grids):
        raise ValueError(f"the chat has {images} image parts for {len(grids)} images")
    if images and image_prompts is None:
        raise ValueError("the chat has image parts but the model takes no images")
    next_grid = iter(grids)
    ids: list[int] = []
    text: list[str] = []  # the run of text since the last control token
    for piece in pieces:
        if isinstance(piece, str):
            text.append(piece)
            continue
        ids += tokenizer.encode("".join(text), literal=True)
        text.clear()
        if piece.token == IMAGE:
            assert image_prompts is not None
            # The placeholder is all special tokens, the checkpoint's own: encoded as such.
            ids += tokenizer.encode(image_prompt(next(next_grid), image_prompts.tokens_per_tile))
        else:
            ids.append(tokenizer.token_to_id(piece.token))
    ids += tokenizer.encode("".join(text), literal=True)
    return ids


__all__ = ["chat_ids"]
