"""The class-conditional benchmark (digits): reward classifier, evaluate, results."""
