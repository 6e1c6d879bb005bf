"""The data and the schedule of `grape train`, so that a PyTorch loop can reproduce a run step for step."""
from . import _C
from ._modules import _settings


def make_tokenizer(spec="byte"):
    """"byte" (257 ids, end-of-text 256) or the path of a SentencePiece .model."""
    return _C.make_tokenizer(str(spec))


def open_data(spec="bible", tokenizer="byte", val_fraction=0.1):
    """A data source as `grape train --data SPEC` opens it; .train_batch(batch, T, seed, step) gives the
    (inputs, targets) [batch,T] int64 that `grape train --seed SEED` trains on at that step."""
    tok = make_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    return _C.open_data(str(spec), tok, float(val_fraction))


def lr_at(step, **train_settings):
    """The learning rate of `grape train` at 0-based `step` for its settings (lr, min_lr, warmup, steps)."""
    return _C.lr_at(_settings(train_settings), int(step))
