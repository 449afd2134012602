"""The evaluation stage: a GGUF model scored offline on held-out suites, no judge model.

run.py      EvalConfig and `evaluate`: the suites on one model, one result JSON
session.py  the model as the suites see it (greedy replies, log-likelihoods), SuiteResult
suites/     one file per suite: its loading, its replies and its metrics
refusal.py  the refusal detector the safety and HarmBench suites share
stats.py    Wilson intervals, the exact McNemar test
report.py   tables, plots and paired comparisons of result files
"""
