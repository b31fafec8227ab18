// The 3D view of the pointflow page: a thinned sample of a job's classified points (the export's
// preview-3d.ply), coloured by class, drawn with three.js (vendor/three, served by the plugin).
// Drag to turn, scroll to zoom, right-drag (or shift-drag) to pan.
import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { PLYLoader } from "three/addons/loaders/PLYLoader.js";

const viewer = document.getElementById("viewer");
const caption = document.getElementById("viewer-caption");

function say(text, state) {
  caption.textContent = text;
  viewer.dataset.state = state;
}

function webglAvailable() {
  try {
    return Boolean(document.createElement("canvas").getContext("webgl2"));
  } catch {
    return false;
  }
}

let renderer, scene, camera, controls, cloud;

function setUp() {
  renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
  renderer.setPixelRatio(window.devicePixelRatio);
  renderer.setSize(viewer.clientWidth, viewer.clientHeight);
  renderer.setClearColor(0xf8f9fb);
  viewer.appendChild(renderer.domElement);
  scene = new THREE.Scene();
  camera = new THREE.PerspectiveCamera(45, viewer.clientWidth / viewer.clientHeight, 0.1, 1e6);
  camera.up.set(0, 0, 1); // z is the elevation
  controls = new OrbitControls(camera, renderer.domElement);
  controls.addEventListener("change", draw);
  new ResizeObserver(() => {
    renderer.setSize(viewer.clientWidth, viewer.clientHeight);
    camera.aspect = viewer.clientWidth / viewer.clientHeight;
    camera.updateProjectionMatrix();
    draw();
  }).observe(viewer);
}

function draw() {
  renderer.render(scene, camera);
}

function show(geometry, label) {
  if (cloud) {
    scene.remove(cloud);
    cloud.geometry.dispose();
  }
  geometry.computeBoundingBox();
  const box = geometry.boundingBox;
  const centre = box.getCenter(new THREE.Vector3());
  const size = box.getSize(new THREE.Vector3());
  const extent = Math.max(size.x, size.y, size.z, 1);
  // Pixel-sized points: a thinned sample stays readable at any zoom.
  cloud = new THREE.Points(geometry, new THREE.PointsMaterial({ size: 2, sizeAttenuation: false, vertexColors: true }));
  scene.add(cloud);
  // From the south-west, above: the way a surveyor first looks at a site.
  camera.position.copy(centre).addScaledVector(new THREE.Vector3(-0.55, -0.95, 0.75).normalize(), 1.35 * extent);
  camera.near = extent / 1000;
  camera.far = extent * 20;
  camera.updateProjectionMatrix();
  controls.target.copy(centre);
  controls.update();
  draw();
  const count = geometry.attributes.position.count;
  viewer.dataset.points = String(count);
  say(`${label}: ${count.toLocaleString("en")} points of the thinned sample, coloured by class as on the map. Drag to turn, scroll to zoom, right-drag to pan.`, "ready");
}

function load(url, label) {
  say(`Loading the 3D sample of ${label}…`, "loading");
  new PLYLoader().load(
    url,
    (geometry) => show(geometry, label),
    undefined,
    () => say(`The 3D sample of ${label} could not be loaded.`, "error"),
  );
}

if (!viewer) {
  // No recent job has a 3D sample: the page says so, there is nothing to draw.
} else if (!webglAvailable()) {
  say("This browser cannot draw WebGL, which the 3D view needs.", "error");
} else {
  setUp();
  for (const button of document.querySelectorAll("button.view3d")) {
    button.addEventListener("click", () => {
      load(button.dataset.sample, button.dataset.label);
      viewer.scrollIntoView({ behavior: "smooth", block: "center" });
    });
  }
  if (viewer.dataset.sample) {
    load(viewer.dataset.sample, viewer.dataset.label);
  }
}
