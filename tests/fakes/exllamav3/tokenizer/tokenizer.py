"""Fake of exllamav3/tokenizer/tokenizer.py (character-level vocabulary from the fake model's tokenizer.json)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .._fake import FakeTensor, FakeVocab, as_id_rows
from ..model.config import Config
from .mm_embedding import MMEmbedding


def _maybe_read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf8") as f:
        return json.load(f)


class Tokenizer:

    def __init__(self, config: Config):
        self.config = config
        self.path_tokenizer_json = os.path.join(config.directory, "tokenizer.json")
        self.path_tokenizer_config_json = os.path.join(config.directory, "tokenizer_config.json")
        self.path_generation_config_json = os.path.join(config.directory, "generation_config.json")
        # Real: HFTokenizer.from_file(tokenizer.json) -> raises if the file is missing
        self._vocab = FakeVocab(config.directory)
        self.tokenizer_config_dict = _maybe_read_json(self.path_tokenizer_config_json)
        self.generation_config_dict = _maybe_read_json(self.path_generation_config_json)
        self.hf_tokenizer = None

        v = self._vocab
        self.extended_piece_to_id = dict(v.special_piece_to_id)
        self.extended_id_to_piece = {i: p for p, i in self.extended_piece_to_id.items()}
        self.unspecial_piece_to_id: dict[str, int] = {}
        self.unspecial_id_to_piece: dict[int, str] = {}

        self.unk_token_id = v.unk_id
        self.unk_token = v.unk_token
        self.eos_token_id = config.eos_token_id
        self.bos_token_id = config.bos_token_id
        self.pad_token_id = config.pad_token_id

        def get_default_token_id(config_key: str, current: int | None, default: int | None) -> int | None:
            if current is not None:
                return current
            if config_key in self.tokenizer_config_dict:
                st = self.tokenizer_config_dict[config_key]
                if st is None:
                    return None
                if isinstance(st, dict):
                    st = st.get("content")
                    if st is None:
                        return None
                if isinstance(st, str):
                    return v.piece_to_id.get(st)
                return None
            return default

        self.pad_token_id = get_default_token_id("pad_token", self.pad_token_id, None)
        self.bos_token_id = get_default_token_id("bos_token", self.bos_token_id, 1)
        self.eos_token_id = get_default_token_id("eos_token", self.eos_token_id, 2)

        # Same EOS bookkeeping as the real one: tokenizer_config.json's eos_token overrides config.eos_token_id and
        # generation_config.json's eos_token_id entries are appended to config.eos_token_id_list
        e = get_default_token_id("eos_token", None, None)
        if e:
            if config.eos_token_id != e:
                config.eos_token_id = e
            if e not in config.eos_token_id_list:
                config.eos_token_id_list.append(e)
        ee = self.generation_config_dict.get("eos_token_id")
        if ee:
            if not isinstance(ee, list):
                ee = [ee]
            for e in ee:
                if e not in config.eos_token_id_list:
                    config.eos_token_id_list.append(e)

        self.bos_token = None if self.bos_token_id is None else v.id_to_piece[self.bos_token_id]
        self.eos_token = None if self.eos_token_id is None else v.id_to_piece[self.eos_token_id]
        if self.pad_token_id is None:
            pad_test = v.piece_to_id.get("<pad>")
            if pad_test is not None:
                self.pad_token_id = pad_test
            elif self.eos_token_id != self.bos_token_id:
                self.pad_token_id = self.eos_token_id
            else:
                self.pad_token_id = -1
        self.pad_token = ""

        self.actual_vocab_size = v.size
        self.newline_token = "\n"
        self.space_token = " "
        self.newline_token_id = v.piece_to_id.get("\n")
        self.space_token_id = v.piece_to_id.get(" ")

        # id -> piece. Non-special list: special tokens decode to "" (what the real _get_fixed_vocab produces for a
        # tokenizer where " t" is more than one token, as here). With special tokens: their literal text.
        self.id_to_piece = ["" if i in v.special_ids else p for i, p in enumerate(v.id_to_piece)]
        self.id_to_piece_with_special = list(v.id_to_piece)
        self.piece_to_id = {p: i for i, p in enumerate(self.id_to_piece)}
        self._special_re = re.compile(
            "(" + "|".join(re.escape(p) for p in sorted(v.special_piece_to_id, key=len, reverse=True)) + ")"
        ) if v.special_piece_to_id else None

    @property
    def raw_vocab_size(self) -> int:
        return self._vocab.size

    @staticmethod
    def from_config(config: Config) -> Tokenizer:
        return Tokenizer(config)

    def single_token(self, token_id: int) -> FakeTensor:
        return FakeTensor.ids([token_id])

    def single_id(self, token: str) -> int | None:
        return self.extended_piece_to_id.get(token, self.get_piece_to_id_dict().get(token))

    # -- encoding

    def _encode_chars(self, text: str) -> list[int]:
        v = self._vocab
        unk = v.unk_id if v.unk_id is not None else 0
        return [v.piece_to_id.get(c, unk) for c in text]

    def _encode_part(self, text: str, special: bool) -> list[int]:
        if not special or self._special_re is None:
            return self._encode_chars(text)
        out: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                out.append(self._vocab.special_piece_to_id[part])
            elif part:
                out += self._encode_chars(part)
        return out

    def encode(
        self,
        text: str | list[str],
        add_bos: bool = False,
        add_eos: bool = False,
        encode_special_tokens: bool = False,
        return_offsets: bool = False,
        embeddings: list[MMEmbedding] | None = None,
    ) -> Any:
        """
        Real: returns a CPU LongTensor of shape (1, n) for a str (batch_size, max_len) left-padded with
        pad_token_id for a list; with return_offsets also a tensor of (negative) padding lengths.
        """
        if embeddings:
            raise NotImplementedError("fake exllamav3: multimodal embeddings are not simulated")
        if isinstance(text, list):
            list_ids = [self._encode_part(t, encode_special_tokens) for t in text]
            if add_bos and self.bos_token_id is not None:
                for ids in list_ids:
                    ids.insert(0, self.bos_token_id)
            if add_eos and self.eos_token_id is not None:
                for ids in list_ids:
                    ids.append(self.eos_token_id)
            max_length = max(len(ids) for ids in list_ids)
            padded = [[self.pad_token_id] * (max_length - len(ids)) + ids for ids in list_ids]
            stacked = FakeTensor(padded, "int64", (len(padded), max_length))
            if return_offsets:
                return stacked, FakeTensor([-(max_length - len(ids)) for ids in list_ids], "int32")
            return stacked

        ids = self._encode_part(text, encode_special_tokens)
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        t = FakeTensor.ids(ids)
        if return_offsets:
            return t, FakeTensor([0], "int32")
        return t

    # -- decoding

    def _decode_seq(self, seq: list[int], decode_special_tokens: bool) -> str:
        v = self._vocab
        if not decode_special_tokens:
            seq = [t for t in seq if t != self.pad_token_id and t < v.size and t != self.eos_token_id]
            return "".join("" if t in v.special_ids else v.id_to_piece[t] for t in seq)
        seq = [t for t in seq if t != self.pad_token_id and t < v.size]
        return "".join(v.id_to_piece[t] for t in seq)

    def decode(self, ids: Any, decode_special_tokens: bool = False) -> str | list[str]:
        """
        Real: 1-D tensor -> str; 2-D tensor -> list[str] (one per row, even for a single row); list of tensors
        -> list of results. Non-tensor input fails the `isinstance(ids, torch.Tensor)` assertion.
        """
        if isinstance(ids, list):
            return [self.decode(i, decode_special_tokens) for i in ids]  # type: ignore[misc]
        assert hasattr(ids, "tolist") and hasattr(ids, "dim"), "ids must be Tensor"
        if ids.dim() > 1:
            return [self._decode_seq([int(x) for x in row], decode_special_tokens) for row in as_id_rows(ids)]
        return self._decode_seq([int(x) for x in ids.tolist()], decode_special_tokens)

    def num_tokens(self, text: str) -> int:
        return len(self._encode_part(text, True))

    # -- vocabulary views

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        return self.id_to_piece_with_special if include_special_tokens else self.id_to_piece

    def get_piece_to_id_dict(self) -> dict[str, int]:
        return self.piece_to_id

    def get_vocab_dict(self) -> dict[str, int]:
        return dict(self._vocab.piece_to_id)

    def get_tokens_with_prefix_string(self, prefix: str) -> list[int]:
        return [i for i, p in enumerate(self.id_to_piece) if p.startswith(prefix)]

    def get_tokens_with_prefix_id(self, prefix_id: int) -> list[int]:
        return self.get_tokens_with_prefix_string(self.id_to_piece[prefix_id])

    # -- chat templates

    def hf_render_chat_template(self, messages: list, add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """
        Real: transformers.AutoTokenizer.from_pretrained(config.directory).apply_chat_template(..., tokenize=False)
        (needs `transformers`, which the exllamav3 wheel does NOT depend on). The fake renders the chat_template of
        tokenizer_config.json with jinja2 the way transformers does (trim_blocks, lstrip_blocks, sandboxed).
        """
        template = self.tokenizer_config_dict.get("chat_template")
        if not template:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **template_kwargs,
        )

    def hf_chat_template(
        self,
        messages: list,
        add_generation_prompt: bool = True,
        embeddings: list[MMEmbedding] | None = None,
        **template_kwargs: Any,
    ) -> FakeTensor:
        """
        Real: renders + tokenizes with transformers (special tokens parsed, no extra BOS beyond the template);
        extra kwargs (enable_thinking=..., tools=...) go to the template. Returns ids of shape (1, n).
        """
        if embeddings:
            raise NotImplementedError("fake exllamav3: multimodal embeddings are not simulated")
        rendered = self.hf_render_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return FakeTensor.ids(self._encode_part(rendered, True))
