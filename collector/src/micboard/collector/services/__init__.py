"""The collector's services: explicit calls with typed results, no hidden side effects."""
