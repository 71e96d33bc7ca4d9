"""The seed walkthrough's example inputs: three tokens over a five-word vocabulary.

``crossent explain`` (without ``--logits``/``--targets``) and part 1 of ``crossent demo`` print
every step of the stable cross entropy on them; the tests check those steps' figures.

Example:
  >>> from crossent.seed import SEED_LOGITS, SEED_TARGETS
  >>> len(SEED_LOGITS), len(SEED_LOGITS[0]), SEED_TARGETS
  (3, 5, [1, 2, 0])
"""

#: The logits, one row of five per token.
SEED_LOGITS = [[1.2, 3.1, 0.7, 2.4, 0.9], [0.5, 1.8, 2.9, 1.1, 0.3], [4.2, 2.5, 3.7, 1.9, 0.8]]
#: The class id of each token's target.
SEED_TARGETS = [1, 2, 0]
