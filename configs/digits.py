"""Any method on scikit-learn's bundled digits with a small CNN (seconds to minutes on a CPU).

  gacd-jax train --config configs/digits.py:pgd_at --workdir runs/teacher
  gacd-jax train --config configs/digits.py:ard --workdir runs/ard \
      --config.teacher.workdir=runs/teacher
The argument after ':' is the method name (default pgd_at); students are narrower than teachers.
"""

from gacd_jax import demo


def get_config(method: str = "pgd_at"):
  method = method or "pgd_at"
  teacher = method in ("pgd_at", "trades")
  return demo.digits_config(method, width=32 if teacher else 8, epochs=30)
