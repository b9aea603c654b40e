"""Procedural head and body CT phantoms with random anatomy, in HU, reproducible from a seed.

Each phantom is a stack of filled ellipses (and rings) in millimetres, drawn with 2x2
supersampling (area-averaged to the output grid, like the real slices), plus a smooth
tissue texture (low-pass filtered noise, a few HU) and a slight blur for the system
resolution. Anatomy is randomised per seed: outline size and shape, fat/skull thickness,
organ sizes and positions, contrast phase, ventricles, small lesions and contrast inserts,
bowel gas, lungs (thorax slices), ribs, vertebrae, a patient table or head holder.

Besides patient-like heads there are head *phantom* objects without soft tissue, like the
Philips head phantom: "skull_air" (a bone ring around air, with a few thin plastic inserts,
rods or a resolution plate; vertex slices are small thick rings) and "skull_water" (the same
ring filled with water, with low- and high-contrast rods). Both have anatomy "head".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0


@dataclass
class Phantom:
    """A procedural slice: HU image, pixel size, anatomy ("head"/"body") and its seed."""
    hu: np.ndarray  # float32 (size, size)
    pixel_spacing_mm: float
    anatomy: str
    seed: int
    region: str  # head: "cerebrum"/"skull_base"/"skull_air"/"skull_water"; body: "abdomen"/"thorax"


class _Canvas:
    """Supersampled drawing surface in millimetres (x right, y down/posterior, origin at centre)."""

    def __init__(self, size: int, fov_mm: float, supersample: int = 2):
        self.size, self.fov, self.ss = size, fov_mm, supersample
        m = size * supersample
        step = fov_mm / m
        coords = (np.arange(m, dtype=np.float32) - m / 2 + 0.5) * step
        self.x, self.y = coords[None, :], coords[:, None]
        self.img = np.full((m, m), AIR_HU, dtype=np.float32)

    def mask(self, cx: float, cy: float, ax: float, ay: float, angle_deg: float = 0.0) -> np.ndarray:
        a = math.radians(angle_deg)
        dx, dy = self.x - cx, self.y - cy
        u = dx * math.cos(a) + dy * math.sin(a)
        v = -dx * math.sin(a) + dy * math.cos(a)
        return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0

    def fill(self, hu: float, cx: float, cy: float, ax: float, ay: float, angle_deg: float = 0.0,
             within: np.ndarray | None = None) -> np.ndarray:
        m = self.mask(cx, cy, ax, ay, angle_deg)
        if within is not None:
            m &= within
        self.img[m] = hu
        return m

    def rect(self, hu: float, x0: float, x1: float, y0: float, y1: float) -> None:
        self.img[(self.x >= x0) & (self.x <= x1) & (self.y >= y0) & (self.y <= y1)] = hu

    def finish(self, rng: np.random.Generator, texture_hu: float, blur_px: float) -> np.ndarray:
        img = self.img
        tissue = (img > -300) & (img < 300)
        if texture_hu > 0:
            field = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 3.0 * self.ss)
            field *= texture_hu / max(float(field.std()), 1e-6)
            img = img + np.where(tissue, field, 0.0).astype(np.float32)
        m = img.shape[0]
        img = img.reshape(m // self.ss, self.ss, m // self.ss, self.ss).mean(axis=(1, 3))
        if blur_px > 0:
            img = ndimage.gaussian_filter(img, blur_px)
        return img.astype(np.float32)


PHANTOM_KINDS = ("head", "body", "skull_air", "skull_water")


def make_phantom(kind: str, seed: int, size: int = 256) -> Phantom:
    """A random phantom of ``kind`` (see PHANTOM_KINDS; HU, ``size`` x ``size``), reproducible from ``seed``."""
    if kind == "head":
        return head_phantom(seed, size)
    if kind == "body":
        return body_phantom(seed, size)
    if kind in ("skull_air", "skull_water"):
        return skull_phantom(seed, size, filled=kind == "skull_water")
    raise ValueError(f"phantom kind must be one of {', '.join(PHANTOM_KINDS)}, not {kind!r}")


def _head_cradle(cv: _Canvas, rng: np.random.Generator, cx: float, cy: float, ax: float, ay: float) -> None:
    """Head holder: a curved plastic cradle with a foam pad under the occiput."""
    hy = cy + ay + rng.uniform(3, 8)
    cv.fill(rng.uniform(80, 250), cx, hy - 55, ax + 22, 60, 0)
    cv.fill(AIR_HU, cx, hy - 60, ax + 17, 60, 0)
    cv.fill(rng.uniform(-900, -750), cx, hy - 62, ax + 12, 58, 0)


def skull_phantom(seed: int, size: int = 256, filled: bool = False) -> Phantom:
    """Head phantom without soft tissue: a skull ring around air (or water, ``filled``) with inserts.

    Geometry is random per seed: ring size and shape (vertex slices: small, thick, blurred rings),
    uneven bone thickness, optional thin skin, a U-shaped holder shell and/or cradle, and inside
    plastic/bone rods, a square insert or a low-density resolution plate with dots.
    """
    rng = np.random.default_rng([seed, 17])
    fov = float(rng.uniform(220, 260))
    cv = _Canvas(size, fov)
    rot = rng.uniform(-10, 10)
    vertex = rng.random() < 0.3
    scale = rng.uniform(0.5, 0.8) if vertex else rng.uniform(0.9, 1.05)
    ax, ay = rng.uniform(62, 74) * scale, rng.uniform(80, 96) * scale
    cx, cy = rng.uniform(-8, 8), rng.uniform(-12, 4)
    skull = rng.uniform(6, 14) if vertex else rng.uniform(3.5, 8)
    if rng.random() < 0.6:  # U-shaped plastic holder shell around the sides and back of the head
        gap, wall = rng.uniform(8, 25), rng.uniform(1.2, 3.0)
        ux, uy, uc = ax / scale + gap, ay / scale + gap, cy + rng.uniform(5, 20)
        lower = np.broadcast_to(cv.y > uc - uy * rng.uniform(0.1, 0.6), cv.img.shape)
        shell = cv.mask(cx, uc, ux, uy) & ~cv.mask(cx, uc, ux - wall, uy - wall) & lower
        cv.img[shell] = rng.uniform(100, 350)
    if rng.random() < 0.6:
        _head_cradle(cv, rng, cx, cy, ax, ay)
    skin = rng.uniform(1, 3) if rng.random() < 0.3 else 0.0
    if skin:
        cv.fill(rng.uniform(-20, 60), cx, cy, ax + skin, ay + skin, rot)
    cv.fill(rng.uniform(700, 1500), cx, cy, ax, ay, rot)  # skull
    # Uneven bone: the inner table is shifted a little, so the ring is thicker on one side.
    sx, sy = rng.uniform(-0.25, 0.25) * skull, rng.uniform(-0.3, 0.3) * skull
    ix, iy = ax - skull, ay - skull * rng.uniform(0.9, 1.3)
    interior_hu = rng.uniform(-4, 6) if filled else rng.uniform(-1000, -975)
    inside = cv.fill(interior_hu, cx + sx, cy + sy, ix, iy, rot)
    if not vertex:
        for _ in range(rng.integers(1, 6) if filled else rng.integers(0, 5)):  # rods
            kind = rng.random()
            if filled:
                hu = rng.uniform(-120, 150) if kind < 0.7 else rng.uniform(300, 1000)
            else:
                hu = rng.uniform(80, 150) if kind < 0.7 else rng.uniform(300, 900)
            r = rng.uniform(3, 11)
            cv.fill(hu, cx + rng.uniform(-0.6, 0.6) * ix, cy + rng.uniform(-0.6, 0.6) * iy, r, r, within=inside)
        if rng.random() < 0.3:  # square insert
            h, px, py = rng.uniform(5, 10), cx + rng.uniform(-0.5, 0.5) * ix, cy + rng.uniform(-0.5, 0.5) * iy
            before = cv.img.copy()
            cv.rect(rng.uniform(80, 150), px - h, px + h, py - h, py + h)
            cv.img = np.where(inside, cv.img, before)
        if not filled and rng.random() < 0.3:  # low-density resolution plate with bright dots
            w, h = rng.uniform(0.5, 0.8) * ix, rng.uniform(0.15, 0.3) * iy
            px, py = cx + rng.uniform(-0.2, 0.2) * ix, cy - rng.uniform(0.1, 0.5) * iy
            plate = cv.fill(rng.uniform(-750, -350), px, py, w, h, 0, within=inside)
            for _ in range(rng.integers(4, 12)):
                cv.fill(rng.uniform(100, 400), px + rng.uniform(-w, w), py + rng.uniform(-h, h), 0.8, 0.8,
                        within=plate)
    hu = cv.finish(rng, texture_hu=rng.uniform(0.0, 1.0), blur_px=rng.uniform(0.8, 1.4) if vertex
                   else rng.uniform(0.3, 0.7))
    return Phantom(hu, fov / size, "head", int(seed), "skull_water" if filled else "skull_air")


def head_phantom(seed: int, size: int = 256) -> Phantom:
    """Random head slice: scalp, skull, cortex, white matter, ventricles, lesions, optional holder."""
    rng = np.random.default_rng(seed)
    fov = float(rng.uniform(220, 260))
    cv = _Canvas(size, fov)
    rot = rng.uniform(-10, 10)
    ax, ay = rng.uniform(66, 80), rng.uniform(84, 100)
    cx, cy = rng.uniform(-6, 6), rng.uniform(-8, 4)
    region = "skull_base" if rng.random() < 0.3 else "cerebrum"
    if region == "skull_base":
        ax, ay = ax * 0.9, ay * 0.9
    scalp = rng.uniform(4, 7)
    skull = rng.uniform(5, 9) if region == "cerebrum" else rng.uniform(7, 12)
    if rng.random() < 0.7:
        _head_cradle(cv, rng, cx, cy, ax, ay)
    cv.fill(rng.uniform(20, 60), cx, cy, ax, ay, rot)  # scalp
    bone = rng.uniform(900, 1600)
    cv.fill(bone, cx, cy, ax - scalp, ay - scalp, rot)  # skull
    inner_x, inner_y = ax - scalp - skull, ay - scalp - skull
    brain = cv.fill(rng.uniform(34, 42), cx, cy, inner_x, inner_y, rot)  # cortex (grey matter)
    cortex = rng.uniform(3, 6)
    white = rng.uniform(24, 30)
    cv.fill(white, cx, cy, inner_x - cortex, inner_y - cortex, rot, within=brain)
    # Gyri: small grey-matter indentations into the white matter near the cortex.
    for _ in range(rng.integers(6, 14)):
        t = rng.uniform(0, 2 * math.pi)
        r = rng.uniform(0.75, 0.92)
        gx, gy = cx + r * (inner_x - cortex) * math.cos(t), cy + r * (inner_y - cortex) * math.sin(t)
        cv.fill(rng.uniform(34, 42), gx, gy, rng.uniform(2, 4), rng.uniform(5, 10), math.degrees(t), within=brain)
    a_rot = math.radians(rot)

    def at(dx: float, dy: float) -> tuple[float, float]:  # offsets in the head's rotated frame
        return (cx + dx * math.cos(a_rot) - dy * math.sin(a_rot), cy + dx * math.sin(a_rot) + dy * math.cos(a_rot))

    if region == "cerebrum":
        csf = rng.uniform(0, 12)
        spread, vlen, vw = rng.uniform(6, 12), rng.uniform(18, 32), rng.uniform(3, 9)
        for side in (-1, 1):
            tilt = side * rng.uniform(8, 20)
            cv.fill(csf, *at(side * spread, rng.uniform(-8, 2)), vw, vlen, rot + tilt, within=brain)
        cv.fill(csf, *at(0, rng.uniform(5, 12)), rng.uniform(1, 2.5), rng.uniform(5, 9), rot, within=brain)
        if rng.random() < 0.6:  # basal ganglia: slightly brighter deep grey matter
            for side in (-1, 1):
                cv.fill(rng.uniform(36, 44), *at(side * rng.uniform(18, 26), rng.uniform(-2, 8)),
                        rng.uniform(5, 8), rng.uniform(9, 14), rot, within=brain)
    else:
        # Petrous bones (dense: they make streaks at low dose), posterior fossa, sinus/mastoid air.
        for side in (-1, 1):
            cv.fill(rng.uniform(1200, 1900), *at(side * rng.uniform(25, 38), rng.uniform(-5, 15)),
                    rng.uniform(5, 9), rng.uniform(18, 28), rot + side * rng.uniform(35, 55))
            if rng.random() < 0.7:
                cv.fill(AIR_HU, *at(side * rng.uniform(38, 50), rng.uniform(5, 15)), rng.uniform(2, 5),
                        rng.uniform(3, 6), rot)
        cv.fill(rng.uniform(30, 40), *at(0, rng.uniform(35, 50)), rng.uniform(25, 35), rng.uniform(18, 25), rot,
                within=brain)
        if rng.random() < 0.6:
            cv.fill(AIR_HU, *at(rng.uniform(-8, 8), -inner_y + rng.uniform(-4, 6)), rng.uniform(6, 14),
                    rng.uniform(4, 8), rot)
    for _ in range(rng.integers(0, 4)):  # lesions: infarcts, haemorrhages, calcifications
        kind = rng.random()
        hu = rng.uniform(5, 18) if kind < 0.45 else rng.uniform(55, 85) if kind < 0.85 else rng.uniform(150, 500)
        r = rng.uniform(1.5, 4) if kind >= 0.85 else rng.uniform(3, 14)
        cv.fill(hu, *at(rng.uniform(-0.6, 0.6) * inner_x, rng.uniform(-0.6, 0.6) * inner_y), r,
                r * rng.uniform(0.6, 1.4), rng.uniform(0, 180), within=brain)
    hu = cv.finish(rng, texture_hu=rng.uniform(1.0, 3.0), blur_px=rng.uniform(0.3, 0.6))
    return Phantom(hu, fov / size, "head", int(seed), region)


def body_phantom(seed: int, size: int = 256) -> Phantom:
    """Random abdomen or lower-thorax slice: fat, muscle, organs, vessels, spine, ribs, lungs, table."""
    rng = np.random.default_rng(seed)
    region = "thorax" if rng.random() < 0.35 else "abdomen"
    ax, ay = rng.uniform(125, 190), rng.uniform(90, 135)
    ay = min(ay, ax * 0.85)
    fov = float(np.clip(2 * ax + rng.uniform(50, 110), 360, 500))
    cv = _Canvas(size, fov)
    cx, cy = rng.uniform(-8, 8), rng.uniform(-15, 0)
    contrast = rng.random() < 0.6
    if rng.random() < 0.75:  # table: two carbon-fibre skins around a foam core, curved slightly
        ty = cy + ay + rng.uniform(4, 12)
        cv.fill(rng.uniform(150, 400), cx, ty + 400, 260, 400 + rng.uniform(8, 14), 0)
        cv.fill(rng.uniform(-900, -800), cx, ty + 400, 257, 400 + rng.uniform(5, 9), 0)
        cv.rect(AIR_HU, -fov, fov, ty + 18, fov)
    fat = rng.uniform(6, 38)
    body = cv.fill(rng.uniform(-60, -20), cx, cy, ax, ay)  # skin
    cv.fill(rng.uniform(-115, -85), cx, cy, ax - 2, ay - 2)  # subcutaneous fat
    wall = rng.uniform(8, 16)
    ix, iy = ax - 2 - fat, ay - 2 - fat
    cv.fill(rng.uniform(40, 60), cx, cy, ix, iy)  # muscle wall
    cavity = cv.fill(rng.uniform(-100, -60), cx, cy, ix - wall, iy - wall)  # visceral fat
    cav_x, cav_y = ix - wall, iy - wall
    blood = rng.uniform(150, 320) if contrast else rng.uniform(35, 50)
    # Spine: vertebral body (trabecular + cortex), canal, posterior elements; paraspinal muscles.
    vy = cy + iy - rng.uniform(30, 45)
    vr = rng.uniform(16, 24)
    for side in (-1, 1):
        cv.fill(rng.uniform(45, 60), cx + side * rng.uniform(25, 35), vy + rng.uniform(15, 25), rng.uniform(18, 26),
                rng.uniform(14, 22), side * rng.uniform(0, 20))
    cv.fill(rng.uniform(700, 1200), cx, vy, vr, vr * rng.uniform(0.8, 0.95))
    cv.fill(rng.uniform(150, 350), cx, vy, vr - 2.5, vr * 0.85 - 2.5)
    cv.fill(rng.uniform(700, 1100), cx, vy + vr + 6, 10, 9)
    cv.fill(rng.uniform(10, 30), cx, vy + vr + 5, 6, 5)
    cv.fill(rng.uniform(600, 1000), cx, vy + vr + 22, 3.5, 10)
    if region == "thorax":
        lung_hu = rng.uniform(-880, -800)
        lx, ly = cav_x * rng.uniform(0.38, 0.48), cav_y * rng.uniform(0.7, 0.9)
        for side in (-1, 1):
            lung = cv.fill(lung_hu, cx + side * (cav_x - lx - 2), cy - rng.uniform(0, 10), lx, ly,
                           side * rng.uniform(-10, 10), within=cavity)
            for _ in range(rng.integers(8, 20)):  # vessels in the lungs
                r = rng.uniform(1, 4)
                cv.fill(rng.uniform(30, 60), cx + side * (cav_x - lx) + rng.uniform(-lx, lx),
                        cy + rng.uniform(-ly, ly), r, r, within=lung)
        heart = cv.fill(rng.uniform(35, 50), cx + rng.uniform(-5, 25), cy - rng.uniform(0, 25),
                        cav_x * rng.uniform(0.3, 0.4), cav_y * rng.uniform(0.5, 0.65), rng.uniform(-30, 30))
        if contrast:
            cv.fill(blood, cx + rng.uniform(0, 25), cy - rng.uniform(0, 20), rng.uniform(12, 25),
                    rng.uniform(12, 25), within=heart)
        cv.fill(blood, cx - rng.uniform(8, 16), vy - vr - 8, rng.uniform(10, 14), rng.uniform(10, 14))
        cv.fill(rng.uniform(600, 1100), cx, cy - iy + wall * 0.5, rng.uniform(8, 14), 5)  # sternum
    else:
        # Liver (patient right = image left), spleen, kidneys, aorta, IVC, bowel with gas or contrast.
        liver_hu = rng.uniform(90, 130) if contrast else rng.uniform(50, 65)
        liver = cv.fill(liver_hu, cx - cav_x * rng.uniform(0.35, 0.5), cy - cav_y * rng.uniform(0.05, 0.3),
                        cav_x * rng.uniform(0.4, 0.55), cav_y * rng.uniform(0.5, 0.75), rng.uniform(-25, 10),
                        within=cavity)
        for _ in range(rng.integers(0, 4)):  # liver lesions (cysts, metastases) and vessels
            r = rng.uniform(3, 14)
            cv.fill(liver_hu + rng.choice([-1, 1]) * rng.uniform(15, 60),
                    cx - cav_x * rng.uniform(0.3, 0.6), cy - cav_y * rng.uniform(-0.1, 0.5), r, r * rng.uniform(0.7, 1.3),
                    within=liver)
        if rng.random() < 0.7:
            cv.fill(rng.uniform(40, 55) + (40 if contrast else 0), cx + cav_x * rng.uniform(0.5, 0.7),
                    cy + cav_y * rng.uniform(-0.1, 0.3), cav_x * rng.uniform(0.15, 0.25), cav_y * rng.uniform(0.25, 0.4),
                    rng.uniform(-40, 0), within=cavity)
        if rng.random() < 0.7:
            kidney = rng.uniform(140, 200) if contrast else rng.uniform(25, 40)
            for side in (-1, 1):
                cv.fill(kidney, cx + side * rng.uniform(45, 70), vy - rng.uniform(0, 15), rng.uniform(18, 26),
                        rng.uniform(25, 35), side * rng.uniform(15, 35), within=cavity)
        cv.fill(blood, cx - rng.uniform(4, 14), vy - vr - rng.uniform(8, 14), rng.uniform(8, 13), rng.uniform(8, 13))
        cv.fill(blood * rng.uniform(0.6, 1.0), cx + rng.uniform(15, 28), vy - vr - rng.uniform(5, 12),
                rng.uniform(7, 12), rng.uniform(6, 10))
        for _ in range(rng.integers(4, 12)):  # bowel loops
            kind = rng.random()
            hu = AIR_HU * rng.uniform(0.85, 1.0) if kind < 0.35 else rng.uniform(200, 450) if kind < 0.55 \
                else rng.uniform(0, 40)
            r = rng.uniform(6, 18)
            cv.fill(rng.uniform(30, 50), cx + rng.uniform(-0.5, 0.8) * cav_x, cy + rng.uniform(-0.3, 0.6) * cav_y,
                    r + 2, r * rng.uniform(0.6, 1.2) + 2, rng.uniform(0, 180), within=cavity)
            cv.fill(hu, cx + rng.uniform(-0.5, 0.8) * cav_x, cy + rng.uniform(-0.3, 0.6) * cav_y, r,
                    r * rng.uniform(0.6, 1.2), rng.uniform(0, 180), within=cavity)
    # Ribs: small bone ellipses along the inside of the wall, more in the thorax.
    n_ribs = int(rng.integers(6, 12)) if region == "thorax" else int(rng.integers(0, 7))
    for _ in range(n_ribs):
        t = rng.uniform(math.pi * 0.9, math.pi * 2.1)  # upper and lateral parts
        cv.fill(rng.uniform(500, 1000), cx + (ix - wall * 0.5) * math.cos(t), cy + (iy - wall * 0.5) * math.sin(t),
                rng.uniform(3, 6), rng.uniform(5, 10), math.degrees(t) + 90, within=body)
    if rng.random() < 0.3:  # contrast insert / calibration rod in the fat (a bright small cylinder)
        cv.fill(rng.uniform(200, 900), cx + rng.uniform(-0.6, 0.6) * ax, cy + rng.uniform(-0.6, 0.6) * ay,
                rng.uniform(3, 8), rng.uniform(3, 8), within=body)
    hu = cv.finish(rng, texture_hu=rng.uniform(2.0, 6.0), blur_px=rng.uniform(0.3, 0.6))
    return Phantom(hu, fov / size, "body", int(seed), region)
