"""``avec tune``: find the layer(s) and the strength that maximise a behaviour score while a side
effect stays within a budget, check the choice on held-out items, and record it in the vector
file as its ``recommended`` setting (:class:`avec.vector.Recommendation`)."""

from avec.tuning.objectives import (ABScore, Budget, ConceptScore, FunctionBudget, FunctionScore,
                                  KeywordScore, KLBudget, LogitDiffScore, MMLUBudget,
                                  PerplexityBudget, RefusalScore, Score)
from avec.tuning.search import TuneConfig, TuneResult, tune

__all__ = ["ABScore", "Budget", "ConceptScore", "FunctionBudget", "FunctionScore",
           "KLBudget", "KeywordScore", "LogitDiffScore", "MMLUBudget", "PerplexityBudget",
           "RefusalScore", "Score", "TuneConfig", "TuneResult", "tune"]
