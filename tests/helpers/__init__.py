"""Shared helpers of the test suites (one place for generators, cases, runners and internals).

Test modules import from here, never from each other:

* :mod:`helpers.common` — seeded generators, dtypes, the backends present on this machine;
* :mod:`helpers.internals` — the one place that names crossent's internal modules;
* :mod:`helpers.cross_entropy` / :mod:`helpers.linear` — cases, inputs, oracle and baseline
  runners of the two loss suites.
"""
