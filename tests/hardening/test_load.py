from tests.hardening.corpus import CASES

X = CASES
