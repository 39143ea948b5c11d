() => {
  // Atelier's page script (modules/ui/hints.py fills in the tooltips and icons).
  const TOOLTIPS = __TOOLTIPS__;
  const ICONS = __ICONS__;

  const config = () => {
    const el = document.querySelector("#atelier-ui-config [data-keyedit-step]");
    const step = parseFloat(el ? el.dataset.keyeditStep : "0.1");
    return { step: step > 0 ? step : 0.1 };
  };

  function decorate() {
    for (const [suffix, text] of Object.entries(TOOLTIPS)) {
      for (const el of document.querySelectorAll(`[id$="${suffix}"]`)) {
        if (el.title !== text) el.title = text;
      }
    }
    for (const [suffix, icon] of Object.entries(ICONS)) {
      for (const el of document.querySelectorAll(`[id$="${suffix}"]`)) {
        const button = el.tagName === "BUTTON" ? el : el.querySelector("button");
        if (!button || button.dataset.atelierIcon === "1") continue;
        button.innerHTML = icon.svg;
        button.setAttribute("aria-label", icon.label);
        button.title = icon.label;
        button.dataset.atelierIcon = "1";
      }
    }
  }

  let pending = null;
  new MutationObserver(() => {
    if (pending === null) pending = setTimeout(() => { pending = null; decorate(); }, 150);
  }).observe(document.body, { childList: true, subtree: true });
  decorate();

  const visible = (el) => el && el.offsetParent !== null;
  const clickVisible = (suffix) => {
    const button = [...document.querySelectorAll(`button[id$="${suffix}"]`)].find(visible);
    if (button) button.click();
    return Boolean(button);
  };

  // -- emphasis editing: Ctrl+Up/Down on a selection or the word at the caret: (word:1.1) --
  function round(value, step) {
    const digits = (String(step).split(".")[1] || "").length;
    return Number(value.toFixed(Math.max(digits, 1)));
  }

  function editAttention(area, up) {
    const step = config().step;
    let text = area.value, start = area.selectionStart, end = area.selectionEnd;
    const word = /[^\s,()\[\]<>:|]/;
    if (start === end) {
      while (start > 0 && word.test(text[start - 1])) start--;
      while (end < text.length && word.test(text[end])) end++;
      if (start === end) return false;
    }
    let inner = text.slice(start, end);
    let weight = 1.0;
    const whole = inner.match(/^\((.*):(-?\d+(?:\.\d+)?)\)$/s);
    const after = text.slice(end).match(/^:(-?\d+(?:\.\d+)?)\)/);
    if (whole) {
      inner = whole[1];
      weight = parseFloat(whole[2]);
    } else if (text[start - 1] === "(" && after) {
      weight = parseFloat(after[1]);
      start -= 1;
      end += after[0].length;
    }
    weight = round(weight + (up ? step : -step), step);
    const replacement = weight === 1 ? inner : `(${inner}:${weight})`;
    area.value = text.slice(0, start) + replacement + text.slice(end);
    const innerStart = weight === 1 ? start : start + 1;
    area.setSelectionRange(innerStart, innerStart + inner.length);
    area.dispatchEvent(new Event("input", { bubbles: true }));
    return true;
  }

  // -- lightbox: the gallery's large image opens full screen; arrows move, Esc or a click closes --
  function galleryImages(gallery) {
    return [...gallery.querySelectorAll(".thumbnail-item img, .thumbnails img")].map((img) => img.src);
  }

  function openLightbox(src, list) {
    closeLightbox();
    const box = document.createElement("div");
    box.id = "atelier-lightbox";
    box.setAttribute("role", "dialog");
    box.setAttribute("aria-label", "Image viewer");
    const img = document.createElement("img");
    img.src = src;
    img.alt = "Result image";
    const close = document.createElement("button");
    close.className = "atelier-lightbox-close";
    close.setAttribute("aria-label", "Close");
    close.title = "Close (Esc)";
    close.textContent = "\u00d7";
    box.append(img, close);
    box.dataset.index = String(Math.max(list.indexOf(src), 0));
    box.atelierList = list.length ? list : [src];
    box.addEventListener("click", closeLightbox);
    document.body.append(box);
  }

  function closeLightbox() {
    const box = document.getElementById("atelier-lightbox");
    if (box) box.remove();
    return Boolean(box);
  }

  function moveLightbox(delta) {
    const box = document.getElementById("atelier-lightbox");
    if (!box) return false;
    const list = box.atelierList;
    const index = (Number(box.dataset.index) + delta + list.length) % list.length;
    box.dataset.index = String(index);
    box.querySelector("img").src = list[index];
    return true;
  }

  document.addEventListener("click", (ev) => {
    const img = ev.target.closest && ev.target.closest(".atelier-gallery img");
    if (!img || img.closest(".thumbnail-item, .thumbnails")) return;
    const gallery = img.closest(".atelier-gallery");
    ev.preventDefault();
    ev.stopPropagation();
    openLightbox(img.src, galleryImages(gallery));
  }, true);

  // -- a number typed outside a slider's range: say what the limit is and what was applied --
  function clampNote(input) {
    const block = input.closest(".block");
    const range = block && block.querySelector("input[type=range]");
    if (!range || input.value === "") return;
    const typed = Number(input.value), low = Number(range.min), high = Number(range.max);
    if (!(typed < low || typed > high)) return;
    const applied = typed < low ? low : high;
    const label = ((block.querySelector("label, [data-testid=block-info]") || {}).innerText || "Value")
      .split("\n")[0].trim();
    let note = block.parentElement.querySelector(`.atelier-clamp-note[data-for="${block.id}"]`);
    if (!note) {
      note = document.createElement("div");
      note.className = "atelier-clamp-note";
      note.setAttribute("role", "status");
      note.dataset.for = block.id;
      block.after(note);
    }
    note.textContent = `${label}: ${typed} is ${typed < low ? "below the minimum" : "above the maximum"} ` +
      `of ${applied}; ${applied} was applied.`;
    clearTimeout(note.atelierTimer);
    note.atelierTimer = setTimeout(() => note.remove(), 10000);
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && ev.target.matches && ev.target.matches("input[type=number]")) clampNote(ev.target);
  }, true);
  document.addEventListener("blur", (ev) => {
    if (ev.target.matches && ev.target.matches("input[type=number]")) clampNote(ev.target);
  }, true);

  // -- fields that follow the loaded model (native size) until the user sets them: any trusted input event
  // in a field marks it as the user's; the decision and the write happen here in one step (native_size.py).
  // Fields in one group (a tab's width and height) are kept together when the user set either. --
  const follow = { touched: new Set(), last: new Map() };
  document.addEventListener("input", (ev) => {
    const block = ev.isTrusted && ev.target.closest && ev.target.closest(".block[id]");
    if (block) follow.touched.add(block.id);
  }, true);
  window.atelierFollowModel = (ids, groups, built, targets, current) => {
    const last = (i) => (follow.last.has(ids[i]) ? follow.last.get(ids[i]) : built[i]);
    const kept = new Set();
    ids.forEach((id, i) => {  // the user's edit, or a value set since (pasted, swapped), keeps the group
      if (follow.touched.has(id) || String(current[i]) !== String(last(i))) kept.add(groups[i]);
    });
    return ids.map((id, i) => {
      const target = targets[i];
      if (target === null || target === undefined || kept.has(groups[i])) return undefined;
      follow.last.set(id, target);
      return target;
    });
  };

  // -- keyboard: Ctrl+Enter generates, Alt+Enter skips, Esc interrupts (or closes the lightbox) --
  document.addEventListener("keydown", (ev) => {  // capture: the page behind the lightbox sees no keys
    if (!document.getElementById("atelier-lightbox")) return;
    if (ev.key === "Escape") closeLightbox();
    else if (ev.key === "ArrowLeft" || ev.key === "ArrowRight") moveLightbox(ev.key === "ArrowLeft" ? -1 : 1);
    else return;
    ev.preventDefault();
    ev.stopImmediatePropagation();
  }, true);

  document.addEventListener("keydown", (ev) => {
    const ctrl = ev.ctrlKey || ev.metaKey;
    if (ctrl && (ev.key === "ArrowUp" || ev.key === "ArrowDown")) {
      const area = ev.target;
      if (area.tagName === "TEXTAREA" && area.closest('[id$="-prompt"]')) {
        if (editAttention(area, ev.key === "ArrowUp")) ev.preventDefault();
      }
      return;
    }
    if (ev.key === "Enter" && ctrl && !ev.altKey) {
      if (clickVisible("-generate")) ev.preventDefault();
    } else if (ev.key === "Enter" && ev.altKey && !ctrl) {
      if (clickVisible("-skip")) ev.preventDefault();
    } else if (ev.key === "Escape" && !document.querySelector(".options:not(.hide), [role=listbox]")) {
      clickVisible("-interrupt");
    }
  });
}
