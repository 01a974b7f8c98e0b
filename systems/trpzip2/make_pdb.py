"""Provenance: how trpzip2.pdb was made (not needed at run time).

    python make_pdb.py /path/to/openmmtools/data/trpzip2-explicit trpzip2.pdb

Reads the pre-2003 (no %FLAG) AMBER prmtop of openmmtools' trpzip2-explicit, which OpenMM cannot
parse, for atom names, residue labels and residue pointers; writes the 12 peptide residues with
the coordinates of trpzip2.crd (waters and the ion dropped); minimises with amber14-all + OBC1.
The minimiser's end point depends on platform and thread count (runs differ by up to ~1 A), so
the shipped trpzip2.pdb is the reference, this script its provenance.
"""

import sys
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app


def _read_prmtop(path: str | Path) -> tuple[list[str], list[str], list[int]]:
    lines = Path(path).read_text().split("\n")
    pos = 1  # line 0 is the title

    def fields(n: int, width: int, conv: type) -> list:
        nonlocal pos
        out = []
        while len(out) < n:
            line = lines[pos]
            pos += 1
            out += [conv(line[k : k + width]) for k in range(0, len(line), width)]
        return out[:n]

    pointers = fields(30, 6, int)
    n_atoms, n_types, n_res = pointers[0], pointers[1], pointers[11]
    names = [s.strip() for s in fields(n_atoms, 4, str)]
    fields(n_atoms, 16, float)  # charges
    fields(n_atoms, 16, float)  # masses
    fields(n_atoms, 6, int)  # atom types
    fields(n_atoms, 6, int)  # excluded-atom counts
    fields(n_types * n_types, 6, int)  # nonbonded parameter index
    labels = [s.strip() for s in fields(n_res, 4, str)]
    first_atom = fields(n_res, 6, int)
    return names, labels, first_atom


def main(src: str, out: str) -> None:
    names, labels, first_atom = _read_prmtop(Path(src) / "trpzip2.prmtop")
    crd = Path(src, "trpzip2.crd").read_text().split("\n")
    values = [float(line[k : k + 12]) for line in crd[2:] for k in range(0, len(line), 12)]
    xyz = np.array(values[: 3 * len(names)]).reshape(-1, 3)  # angstrom
    n_pep = first_atom[labels.index("Cl-")] - 1
    res_of = np.searchsorted(first_atom, np.arange(1, n_pep + 1), side="right")
    records = []
    for k in range(n_pep):
        name = names[k]
        atom = f" {name}" if len(name) < 4 else name
        r = res_of[k]
        records.append(
            f"ATOM  {k + 1:5d} {atom:<4s} {labels[r - 1]:>3s} A{r:4d}    "
            f"{xyz[k, 0]:8.3f}{xyz[k, 1]:8.3f}{xyz[k, 2]:8.3f}  1.00  0.00          {name[0]:>2s}"
        )
    raw = Path(out).with_suffix(".raw.pdb")
    raw.write_text("\n".join([*records, "TER", "END"]) + "\n")
    pdb = app.PDBFile(str(raw))
    ff = app.ForceField("amber14-all.xml", "implicit/obc1.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001))
    ctx.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 2000)
    with open(out, "w") as f:
        f.write(
            "REMARK   1 trpzip2 (PDB 1LE1 model 1, protonated), from openmmtools "
            "data/trpzip2-explicit,\n"
            "REMARK   1 waters and ion removed, minimised with amber14-all + OBC1 (OpenMM 8.6).\n"
        )
        positions = ctx.getState(getPositions=True).getPositions()
        app.PDBFile.writeFile(pdb.topology, positions, f, keepIds=True)
    raw.unlink()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
