"""Real Pyro programs, copied from Pyro's tutorials, examples and test suite (each file says from
where), unchanged apart from data loading and sizes: the package must train, score and complete
them as their authors wrote them."""
