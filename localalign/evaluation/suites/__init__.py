"""One file per evaluation suite, each with its loading, its replies and its metrics:
`score(session, limit) -> SuiteResult`. evaluation/run.py names them."""
