"""A test proposer that knows each prompt's reference output and drafts it, corrupted at a deterministic place
per step, so verification sees every accepted length from 0 to k (and drafts that run through an end)."""

from __future__ import annotations

import hashlib

from herd.engine.speculative.proposer import StepRows


class OracleProposer:
    aux_layers: tuple[int, ...] = ()

    def __init__(self, references: dict[tuple[int, ...], list[int]], *, vocab: int, clean: bool = False) -> None:
        self.references = references
        self.vocab = vocab
        self.clean = clean
        self.calls = 0

    def propose(self, step: StepRows, wanted):
        self.calls += 1
        drafts = []
        for seq, k in wanted:
            done = len(seq.output_ids)
            future = self.references.get(tuple(seq.prompt_ids), [])[done : done + k]
            draft = list(future) + [(done * 7 + 3) % self.vocab] * (k - len(future))  # past the end: guesses
            if not self.clean:
                digest = hashlib.blake2b(f"{seq.request_id}:{done}".encode(), digest_size=2).digest()
                wrong = int.from_bytes(digest, "little") % (k + 2)  # k or k+1: nothing corrupted
                if wrong < k:
                    draft[wrong] = (draft[wrong] + 1) % self.vocab
            drafts.append(draft)
        return drafts

    def forget(self, seq) -> None:
        pass
