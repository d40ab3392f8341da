"""The course's reusable pieces, one module per concept.

Each chapter builds a piece step by step in its notebook; the final form lives here and
every later chapter imports it:

- ``shared.utils``: device choice, seeding, quick mode and the environment banner
- ``shared.data``: the data directory, downloads and the datasets
- ``shared.tokenizer``: tokenizers (ch02)
"""

__version__ = "0.1.0"
