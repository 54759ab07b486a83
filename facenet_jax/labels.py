"""The label convention shared by the data pipeline, the losses and evaluation.

Batches carry ``label: [B] int32``, the identity of each row. Fixed batch shapes are kept by
padding with rows labelled ``IGNORE_LABEL``: such a row is never an anchor, positive or negative
in mining, never enters a verification pair, a retrieval query, a gallery or an episode. This
module has no dependencies, so evaluation code can import it without the data pipeline.
"""

IGNORE_LABEL = -1  # Label of padding rows; excluded from mining and evaluation everywhere.
