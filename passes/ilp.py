"""What the ILP passes share about PuLP and its bundled CBC.

PuLP reports two codes after a solve: ``status`` (Optimal even when CBC stopped at its
time limit with an incumbent) and ``sol_status`` (which tells those apart).
:func:`solver_status` turns them into one honest word; :func:`require_cbc` fails early
with the fix when no CBC binary runs.
"""

from __future__ import annotations

import pulp

from partc.errors import ErrorContext, SolverError

INSTALL_CBC = "`pip install pulp` ships the CBC binary; check that pulp.PULP_CBC_CMD().available() is true"


def solver_status(status: int, sol_status: int) -> str:
    """"optimal", "feasible" (stopped at the time limit with a solution), "infeasible",
    "unbounded", "no_solution" (stopped before finding one) or "error"."""
    if sol_status == pulp.LpSolutionOptimal and status == pulp.LpStatusOptimal:
        return "optimal"
    if sol_status == pulp.LpSolutionIntegerFeasible:
        return "feasible"
    if status == pulp.LpStatusInfeasible or sol_status == pulp.LpSolutionInfeasible:
        return "infeasible"
    if status == pulp.LpStatusUnbounded or sol_status == pulp.LpSolutionUnbounded:
        return "unbounded"
    if status == pulp.LpStatusNotSolved or sol_status == pulp.LpSolutionNoSolutionFound:
        return "no_solution"
    return "error"


def require_cbc(pass_name: str) -> None:
    """Raise :class:`SolverError` naming the fix when PuLP's CBC cannot run."""
    if not pulp.PULP_CBC_CMD().available():
        raise SolverError(
            f"the CBC solver is not available (PuLP looked for it at {pulp.PULP_CBC_CMD().path!r})",
            ErrorContext(pass_name=pass_name, fix=INSTALL_CBC),
        )
