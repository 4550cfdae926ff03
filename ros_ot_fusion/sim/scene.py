"""A seeded street of coloured triangle meshes, ray-cast with Open3D (Embree).

World frame: x along the street, y to the left, z up; the street runs from x = 0 to
x = `length`, the road is |y| < 6 m (two lanes, parking strips), sidewalks beyond, then
building fronts at |y| ≈ 9.5–12.5 m.

Why this shape: a rigid transform must be observable from one frame. The ground fixes z,
roll and pitch; facades facing ±y (street fronts) and ±x (building sides at alleys, the two
end walls) fix y, x and yaw; poles, trees and parked cars break the symmetry along the
street. Every triangle carries one colour (the object's base colour times a pattern —
windows and floor bands on facades, lane markings and paving tiles on the ground, bands on
poles — plus a little per-triangle jitter), so colour varies along every surface and a test
can tell whether a colour came from the right place. The colours include Lambertian sun
shading, which does not depend on the viewpoint, so a surface point has one true colour.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

KINDS = ("ground", "facade", "pole", "car", "vegetation", "clutter")
INVALID_ID = o3d.t.geometry.RaycastingScene.INVALID_ID
_SUN = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])
_MARGIN = 40.0            # ground and end walls extend this far beyond both ends of the street
_GROUND_CELL = 0.5        # m; also the lane-marking resolution
_FACADE_CELL = 0.5
_ROAD_HALF_WIDTH = 6.0    # kerb line
_KERB = 0.12              # sidewalk height above the road


@dataclass
class Hits:
    """First hits of a batch of rays; `t` is inf and the ids are INVALID_ID where a ray hit nothing."""

    t: np.ndarray             # (N,) float32, in units of each ray's direction length
    geometry_id: np.ndarray   # (N,) uint32
    primitive_id: np.ndarray  # (N,) uint32: triangle index within the geometry
    normal: np.ndarray        # (N, 3) float32, world frame, facing out of the object

    @property
    def hit(self) -> np.ndarray:
        return np.isfinite(self.t)


def ground_height(x, y) -> np.ndarray:
    """Height of the ground at (x, y): a 0.5 % climb, gentle bumps, a raised sidewalk."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    bumps = 0.05 * np.sin(0.9 * x + 0.3) * np.cos(0.7 * y) + 0.03 * np.sin(0.23 * x - 0.11 * y)
    kerb = _KERB * np.clip((np.abs(y) - (_ROAD_HALF_WIDTH - 0.25)) / 0.5, 0.0, 1.0)
    return 0.005 * x + bumps + kerb


# ---------------------------------------------------------------------------- mesh pieces

def _grid(origin, u, v, cell):
    """A planar rectangle origin + [0,1]u + [0,1]v cut into ~cell-sized quads; normal u × v."""
    origin, u, v = (np.asarray(a, float) for a in (origin, u, v))
    nu = max(1, int(np.ceil(np.linalg.norm(u) / cell)))
    nv = max(1, int(np.ceil(np.linalg.norm(v) / cell)))
    i, j = np.meshgrid(np.arange(nu + 1) / nu, np.arange(nv + 1) / nv, indexing="ij")
    vertices = origin + i.reshape(-1, 1) * u + j.reshape(-1, 1) * v
    a = (np.arange(nu)[:, None] * (nv + 1) + np.arange(nv)[None, :]).reshape(-1)
    b, c, d = a + nv + 1, a + nv + 2, a + 1                  # (i+1, j), (i+1, j+1), (i, j+1)
    triangles = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return vertices, triangles


def _merge(parts):
    vertices, triangles, n = [], [], 0
    for v, t in parts:
        vertices.append(v)
        triangles.append(t + n)
        n += len(v)
    return np.concatenate(vertices), np.concatenate(triangles)


def _box(lo, hi, cell, coarse=None, faces="-x+x-y+y+z"):
    """An axis-aligned box of gridded faces with outward normals (`faces` picks which)."""
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    X, Y, Z = np.array([x1 - x0, 0, 0]), np.array([0, y1 - y0, 0]), np.array([0, 0, z1 - z0])
    spec = {"-x": ((x0, y0, z0), Z, Y), "+x": ((x1, y0, z0), Y, Z),
            "-y": ((x0, y0, z0), X, Z), "+y": ((x0, y1, z0), Z, X),
            "-z": ((x0, y0, z0), Y, X), "+z": ((x0, y0, z1), X, Y)}
    coarse = coarse or {}
    return _merge([_grid(*spec[f], coarse.get(f, cell)) for f in spec if f in faces])


def _legacy(mesh):
    return np.asarray(mesh.vertices, float), np.asarray(mesh.triangles, np.int64)


def _cylinder(x, y, z0, radius, height):
    v, t = _legacy(o3d.geometry.TriangleMesh.create_cylinder(
        radius=radius, height=height, resolution=16, split=max(1, int(height / 0.5))))
    return v + (x, y, z0 + height / 2), t


def _blob(centre, radii, rng, resolution=10):
    """A sphere scaled to an ellipsoid and dented by a smooth random field: a bush or a crown."""
    v, t = _legacy(o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=resolution))
    waves = rng.normal(size=(4, 3)) * 2.5
    phases = rng.uniform(0, 2 * np.pi, 4)
    bump = 1.0 + 0.08 * np.sin(v @ waves.T + phases).sum(1)
    return v * bump[:, None] * radii + centre, t


def _rotate_z(vertices, centre, yaw):
    c, s = np.cos(yaw), np.sin(yaw)
    d = vertices - centre
    return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1], d[:, 2]], 1) + centre


# ---------------------------------------------------------------------------- colour patterns
# Each maps triangle centroids (M, 3) and unit normals (M, 3) to base colours in [0, 1].

def _ground_colour(c, n):
    x, ay = c[:, 0], np.abs(c[:, 1])
    colour = np.tile([0.26, 0.26, 0.28], (len(c), 1))                  # asphalt
    tile = (np.floor(c[:, 0]) + np.floor(c[:, 1])) % 2 == 0
    sidewalk = ay > _ROAD_HALF_WIDTH + 0.25
    colour[sidewalk] = np.where(tile[sidewalk, None], [0.62, 0.6, 0.56], [0.5, 0.48, 0.45])
    colour[(ay > _ROAD_HALF_WIDTH - 0.25) & ~sidewalk] = [0.72, 0.72, 0.7]        # kerb stones
    white = [0.92, 0.92, 0.88]
    colour[(ay < 0.25) & (np.mod(x, 9.0) < 3.0)] = white                          # centre dashes
    colour[(ay > 3.75) & (ay < 4.25)] = white                                     # lane edges
    yellow = (ay > 4.25) & (ay < 5.75) & (np.mod(x, 12.0) < 0.5)                  # parking bays
    colour[yellow] = [0.85, 0.7, 0.15]
    return colour


def _facade_colour(base, floor0):
    def colour(c, n):
        out = np.tile(base, (len(c), 1))
        vertical = np.abs(n[:, 2]) < 0.5
        along = np.where(np.abs(n[:, 1]) > np.abs(n[:, 0]), c[:, 0], c[:, 1])
        zf = np.mod(c[:, 2] - floor0, 3.0)
        window = vertical & (zf > 1.0) & (zf < 2.5) & (np.mod(along, 2.5) > 0.75) & (np.mod(along, 2.5) < 1.75)
        band = vertical & (zf < 0.5)
        out[window] = [0.16, 0.2, 0.28]
        out[band] = np.asarray(base) * 0.7
        out[~vertical] = [0.3, 0.3, 0.32]                                  # roofs
        return out
    return colour


def _pole_colour(c, n):
    stripe = np.mod(c[:, 2], 1.0) < 0.25
    return np.where(stripe[:, None], [0.85, 0.85, 0.8], [0.35, 0.37, 0.4])


def _car_colour(base, z_ground, z_cabin):
    def colour(c, n):
        out = np.tile(base, (len(c), 1))
        rel = c[:, 2] - z_ground
        out[rel < 0.55] = np.asarray(base) * 0.55                          # bumpers, sills
        glass = (c[:, 2] > z_cabin + 0.05) & (np.abs(n[:, 2]) < 0.5)
        out[glass] = [0.08, 0.1, 0.14]
        return out
    return colour


def _plain(base):
    return lambda c, n: np.tile(base, (len(c), 1))


def _green(c, n):
    return np.tile([0.22, 0.45, 0.18], (len(c), 1)) * (0.8 + 0.35 * (n[:, 2:3] > 0))


# ---------------------------------------------------------------------------- the scene

class Scene:
    """The street as a RaycastingScene plus per-triangle colour, albedo and object kind.

    `Scene(seed, length)` builds the same world for the same arguments.
    """

    def __init__(self, seed: int = 0, length: float = 200.0):
        self.seed, self.length = seed, float(length)
        self.names: list[str] = []
        self._parts: list[tuple] = []
        rng = np.random.default_rng(seed)
        self._build(rng)
        self._commit(rng)

    # -- construction
    def _add(self, name, kind, mesh, pattern):
        self._parts.append((name, KINDS.index(kind), *mesh, pattern))

    def _build(self, rng):
        L = self.length
        x0, x1, w = -_MARGIN, L + _MARGIN, 40.25    # cell edges at y = ±0.25 + 0.5 k: on the markings' edges
        v, t = _grid((x0, -w, 0), (x1 - x0, 0, 0), (0, 2 * w, 0), _GROUND_CELL)
        v[:, 2] = ground_height(v[:, 0], v[:, 1])
        self._add("ground", "ground", (v, t), _ground_colour)

        palette = [(0.82, 0.74, 0.6), (0.62, 0.3, 0.24), (0.7, 0.7, 0.68), (0.9, 0.86, 0.74),
                   (0.55, 0.65, 0.75), (0.75, 0.55, 0.4), (0.5, 0.52, 0.5)]
        for side in (-1, 1):
            x, k = x0 + 5.0, 0
            while x < x1 - 15.0:
                width = rng.uniform(10, 28)
                front = 9.5 + rng.uniform(0, 3)
                depth, height = rng.uniform(8, 15), rng.uniform(5, 24)
                z0 = np.floor(ground_height(x, side * front) - 1.0)
                ylo, yhi = sorted((side * front, side * (front + depth)))
                back = "+y" if side > 0 else "-y"                     # faces away from the street
                mesh = _box((x, ylo, z0), (x + width, yhi, z0 + 1.0 + height), _FACADE_CELL,
                            coarse={back: 4.0, "+z": 4.0})
                base = palette[rng.integers(len(palette))]
                self._add(f"building_{'left' if side > 0 else 'right'}_{k}", "facade", mesh,
                          _facade_colour(base, z0 + 1.0))
                x += width + (rng.uniform(3, 8) if rng.random() < 0.35 else rng.uniform(0, 0.5))
                k += 1
        for k, xe in enumerate((x0 - 2.0, x1)):                              # end walls across the street
            mesh = _box((xe, -w, -1.0), (xe + 2.0, w, 20.0), 1.0, coarse={"+z": 4.0})
            self._add(f"end_wall_{k}", "facade", mesh, _facade_colour((0.7, 0.62, 0.52), 0.0))

        for side in (-1, 1):
            x = rng.uniform(0, 10)
            while x < L:                                                      # parked cars
                if rng.random() < 0.75:
                    self._car(f"car_{side:+d}_{int(x)}", x, side * rng.uniform(4.7, 5.1), rng)
                x += rng.uniform(5.5, 10.0)
            x = rng.uniform(0, 12)
            while x < L:                                                      # lamp posts
                y = side * 6.8
                r, h = rng.uniform(0.08, 0.18), rng.uniform(4, 8)
                zg = ground_height(x, y) - 0.3
                self._add(f"pole_{side:+d}_{int(x)}", "pole", _cylinder(x, y, zg, r, h + 0.3), _pole_colour)
                x += rng.uniform(12, 22)
            x = rng.uniform(0, 15)
            while x < L:                                                      # trees
                y = side * rng.uniform(7.5, 8.2)
                trunk = rng.uniform(2.0, 3.0)
                zg = ground_height(x, y) - 0.3
                radii = (rng.uniform(1.2, 2.2), rng.uniform(1.2, 2.2), rng.uniform(1.4, 2.4))
                self._add(f"trunk_{side:+d}_{int(x)}", "vegetation", _cylinder(x, y, zg, 0.15, trunk + 0.5),
                          _plain((0.35, 0.25, 0.18)))
                self._add(f"crown_{side:+d}_{int(x)}", "vegetation",
                          _blob((x, y, zg + 0.3 + trunk + 0.6 * radii[2]), radii, rng), _green)
                x += rng.uniform(10, 25)
            x = rng.uniform(0, 10)
            while x < L:                                                      # bushes and bins
                y = side * rng.uniform(8.6, 9.3)
                zg = ground_height(x, y)
                if rng.random() < 0.5:
                    radii = (rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.8))
                    self._add(f"bush_{side:+d}_{int(x)}", "vegetation",
                              _blob((x, y, zg + 0.5 * radii[2]), radii, rng, 8), _green)
                else:
                    sx, sy, sz = rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.8), rng.uniform(0.8, 1.2)
                    colour = [(0.15, 0.45, 0.25), (0.15, 0.3, 0.6), (0.85, 0.45, 0.1)][rng.integers(3)]
                    mesh = _box((x, y - sy / 2, zg - 0.1), (x + sx, y + sy / 2, zg + sz), 0.2)
                    self._add(f"bin_{side:+d}_{int(x)}", "clutter", mesh, _plain(colour))
                x += rng.uniform(6, 18)

    def _car(self, name, x, y, rng):
        length, width = rng.uniform(4.0, 4.9), rng.uniform(1.7, 1.9)
        zg = ground_height(x + length / 2, y)
        z_body = zg + rng.uniform(1.0, 1.15)
        cab_len, cab_h = rng.uniform(2.0, 2.6), rng.uniform(0.45, 0.6)
        cx = x + rng.uniform(0.6, length - cab_len - 0.5)
        body = _box((x, y - width / 2, zg + 0.3), (x + length, y + width / 2, z_body), 0.3,
                    faces="-x+x-y+y-z+z")
        cabin = _box((cx, y - width / 2 + 0.1, z_body), (cx + cab_len, y + width / 2 - 0.1, z_body + cab_h), 0.3)
        v, t = _merge([body, cabin])
        v = _rotate_z(v, np.array([x + length / 2, y, zg]), np.radians(rng.uniform(-3, 3)))
        base = [(0.75, 0.1, 0.1), (0.1, 0.2, 0.6), (0.85, 0.85, 0.85), (0.15, 0.15, 0.15),
                (0.3, 0.5, 0.3), (0.8, 0.6, 0.1)][rng.integers(6)]
        self._add(name, "car", (v, t), _car_colour(base, zg, z_body))

    def _commit(self, rng):
        """Add every part to the ray-casting scene; bake colours (pattern × jitter × sun) per triangle."""
        self._raycaster = o3d.t.geometry.RaycastingScene()
        colours, albedos, kinds, offsets = [], [], [], [0]
        for gid, (name, kind, vertices, triangles, pattern) in enumerate(self._parts):
            got = self._raycaster.add_triangles(o3d.core.Tensor(vertices.astype(np.float32)),
                                                o3d.core.Tensor(triangles.astype(np.uint32)))
            assert got == gid, "geometry ids are handed out in order"
            tri = vertices[triangles]
            centroid = tri.mean(1)
            normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
            normal /= np.linalg.norm(normal, axis=1, keepdims=True)
            base = pattern(centroid, normal) * rng.uniform(0.93, 1.07, (len(triangles), 1))
            base = np.clip(base, 0.0, 1.0)
            albedos.append((base @ [0.299, 0.587, 0.114]).astype(np.float32))
            shade = 0.6 + 0.4 * np.clip(normal @ _SUN, 0.0, 1.0)
            colours.append(np.clip(np.rint(255 * base * shade[:, None]), 0, 255).astype(np.uint8))
            kinds.append(kind)
            offsets.append(offsets[-1] + len(triangles))
            self.names.append(name)
        self._colour = np.concatenate(colours)
        self._albedo = np.concatenate(albedos)
        self._offset = np.asarray(offsets[:-1], np.int64)
        self.kind = np.asarray(kinds, np.int8)          # kind index (into KINDS) per geometry id
        self.triangle_count = offsets[-1]
        self._parts = []

    # -- queries
    def cast(self, origins, directions) -> Hits:
        """First hit of each ray origin + t·direction (t in units of |direction|)."""
        rays = np.empty((len(directions), 6), np.float32)
        rays[:, :3], rays[:, 3:] = origins, directions
        out = self._raycaster.cast_rays(o3d.core.Tensor(rays))
        return Hits(t=out["t_hit"].numpy(), geometry_id=out["geometry_ids"].numpy(),
                    primitive_id=out["primitive_ids"].numpy(), normal=out["primitive_normals"].numpy())

    def _index(self, geometry_id, primitive_id):
        geometry_id = np.asarray(geometry_id)
        if np.any(geometry_id == INVALID_ID):
            raise ValueError("a ray that hit nothing has no surface")
        return self._offset[geometry_id] + np.asarray(primitive_id, np.int64)

    def colour(self, geometry_id, primitive_id) -> np.ndarray:
        """(N, 3) uint8 colours of the given triangles."""
        return self._colour[self._index(geometry_id, primitive_id)]

    def albedo(self, geometry_id, primitive_id) -> np.ndarray:
        """(N,) float32 reflectivity in [0, 1] (luminance of the unshaded colour)."""
        return self._albedo[self._index(geometry_id, primitive_id)]

    def distance(self, points) -> np.ndarray:
        """(N,) unsigned distance from world points to the nearest surface."""
        return self._raycaster.compute_distance(
            o3d.core.Tensor(np.asarray(points, np.float32))).numpy()

    def closest(self, points) -> tuple[np.ndarray, np.ndarray]:
        """(geometry_id, primitive_id) of the surface nearest to each world point."""
        out = self._raycaster.compute_closest_points(o3d.core.Tensor(np.asarray(points, np.float32)))
        return out["geometry_ids"].numpy(), out["primitive_ids"].numpy()

    def colour_at(self, points) -> np.ndarray:
        """(N, 3) uint8 true colour of the surface nearest to each world point."""
        return self.colour(*self.closest(points))
