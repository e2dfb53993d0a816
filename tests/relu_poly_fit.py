"""How the polynomials of the ReLU's arccos-free forms in ``ops`` were obtained (run as a script to print them).

* ``R(a) = (sqrt(1 - a^2) - a arccos a) / (1 - a)^(3/2)`` (``ops._R_POLY32``, ``ops._R_POLY64``): the ReLU
  expectation;
* ``A(a) = arccos(a) / sqrt(1 - a)`` (``ops._A_POLY32``, ``ops._A_POLY64``): the ReLU's derivative
  expectation, which multiplies the neural tangent kernel.

Both are analytic on [0, 1]; each is interpolated at ``degree + 1`` Chebyshev nodes of [0, 1] in 60-digit
arithmetic and returned as monomial coefficients (lowest first). ``test_relu.py`` checks that the library's
coefficients are these.
"""

from __future__ import annotations

import mpmath as mp


def r_exact(a):
    a = mp.mpf(a)
    if a == 1:
        return 2 * mp.sqrt(2) / 3
    return (mp.sqrt(1 - a * a) - a * mp.acos(a)) / (1 - a) ** mp.mpf(1.5)


def a_exact(a):
    a = mp.mpf(a)
    if a == 1:
        return mp.sqrt(2)
    return mp.acos(a) / mp.sqrt(1 - a)


FUNCTIONS = {"R": r_exact, "A": a_exact}


def fit(degree: int, function=r_exact) -> list[float]:
    with mp.workdps(60):
        n = degree + 1
        nodes = [(1 + mp.cos(mp.pi * (k + mp.mpf(1) / 2) / n)) / 2 for k in range(n)]
        vandermonde = mp.matrix([[x**j for j in range(n)] for x in nodes])
        coefs = mp.lu_solve(vandermonde, mp.matrix([function(x) for x in nodes]))
        return [float(coefs[j]) for j in range(n)]


def max_relative_error(coefs: list[float], points: int = 2001, function=r_exact) -> float:
    with mp.workdps(40):
        worst = mp.mpf(0)
        for i in range(points):
            x = mp.mpf(i) / (points - 1)
            p = sum(mp.mpf(c) * x**j for j, c in enumerate(coefs))
            worst = max(worst, abs(p / function(x) - 1))
        return float(worst)


if __name__ == "__main__":
    # float32 and float64 degrees as stored in ops
    for name, function, degrees in (("R", r_exact, (6, 16)), ("A", a_exact, (8, 16))):
        for degree in degrees:
            coefs = fit(degree, function)
            print(f"{name}, degree {degree}: max relative error {max_relative_error(coefs, function=function):.2e}")
            print("\n".join(f"    {c!r}," for c in coefs))
