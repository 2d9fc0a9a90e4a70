package main

import (
	"bufio"
	"encoding/csv"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"
	"os"
	"strconv"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// A soak's plot: three panels over elapsed minutes, the edge's heap in
// use and RSS (MiB), its goroutines, and its sessions, each with its own
// y axis from zero, so a leak shows as a slope and a flat line is flat.

type series struct {
	name  string
	col   int     // column of the sample rows
	scale float64 // divides the raw value
	color color.RGBA
}

type panel struct {
	title  string
	series []series
}

var soakPanels = []panel{
	{"edge memory (MiB)", []series{
		{"heap in use", 1, 1 << 20, color.RGBA{0x1f, 0x77, 0xb4, 0xff}},
		{"RSS", 2, 1 << 20, color.RGBA{0xff, 0x7f, 0x0e, 0xff}},
	}},
	{"edge goroutines", []series{{"goroutines", 3, 1, color.RGBA{0x2c, 0xa0, 0x2c, 0xff}}}},
	{"edge sessions", []series{{"sessions", 4, 1, color.RGBA{0x94, 0x67, 0xbd, 0xff}}}},
}

// plotSoak draws the samples (rows of elapsed_s and soakColumns) to a PNG.
func plotSoak(path, title string, samples [][]float64) error {
	if len(samples) < 2 {
		return errors.New("plot: fewer than two samples")
	}
	const w, ph, top, left, right, gap = 960, 200, 40, 80, 20, 50
	h := top + len(soakPanels)*(ph+gap)
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	text(img, left, 22, title, color.Black)
	tmax := samples[len(samples)-1][0] / 60
	for i, p := range soakPanels {
		y0 := top + i*(ph+gap) + 20 // panel's top
		x0, x1, y1 := left, w-right, y0+ph
		ymax := 0.0
		for _, s := range p.series {
			for _, row := range samples {
				ymax = math.Max(ymax, row[s.col]/s.scale)
			}
		}
		ymax = niceCeil(ymax)
		text(img, x0, y0-6, p.title, color.Black)
		// Axes, grid and tick labels: 4 steps on y, 6 on x.
		grey := color.RGBA{0xdd, 0xdd, 0xdd, 0xff}
		for k := 0; k <= 4; k++ {
			y := y1 - k*ph/4
			hline(img, x0, x1, y, grey)
			text(img, 4, y+4, strconv.FormatFloat(ymax*float64(k)/4, 'g', 4, 64), color.Black)
		}
		for k := 0; k <= 6; k++ {
			x := x0 + k*(x1-x0)/6
			vline(img, x, y0, y1, grey)
			text(img, x-8, y1+14, strconv.FormatFloat(tmax*float64(k)/6, 'f', 1, 64), color.Black)
		}
		hline(img, x0, x1, y1, color.Black)
		vline(img, x0, y0, y1, color.Black)
		if i == len(soakPanels)-1 {
			text(img, (x0+x1)/2-40, y1+30, "elapsed minutes", color.Black)
		}
		lx := x1 - 200
		for si, s := range p.series {
			px := func(row []float64) (int, int) {
				x := x0 + int(float64(x1-x0)*row[0]/60/math.Max(tmax, 1e-9))
				y := y1 - int(float64(ph)*(row[s.col]/s.scale)/math.Max(ymax, 1e-9))
				return x, y
			}
			for j := 1; j < len(samples); j++ {
				ax, ay := px(samples[j-1])
				bx, by := px(samples[j])
				line(img, ax, ay, bx, by, s.color)
			}
			hline(img, lx, lx+20, y0+8+si*14, s.color)
			text(img, lx+26, y0+12+si*14, s.name, s.color)
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// niceCeil rounds up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func text(img *image.RGBA, x, y int, s string, c color.Color) {
	d := &font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func hline(img *image.RGBA, x0, x1, y int, c color.Color) {
	for x := x0; x <= x1; x++ {
		img.Set(x, y, c)
	}
}

func vline(img *image.RGBA, x, y0, y1 int, c color.Color) {
	for y := y0; y <= y1; y++ {
		img.Set(x, y, c)
	}
}

// line draws a 2-pixel-wide line (Bresenham).
func line(img *image.RGBA, x0, y0, x1, y1 int, c color.Color) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for {
		img.Set(x0, y0, c)
		img.Set(x0, y0+1, c)
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

func sign(x int) int {
	switch {
	case x > 0:
		return 1
	case x < 0:
		return -1
	}
	return 0
}

// readSoakCSV reads what soak wrote, for plotting again.
func readSoakCSV(r io.Reader) ([][]float64, error) {
	recs, err := csv.NewReader(bufio.NewReader(r)).ReadAll()
	if err != nil {
		return nil, err
	}
	if len(recs) < 2 || len(recs[0]) != len(soakColumns)+1 {
		return nil, fmt.Errorf("not a soak CSV (want a header and rows of %d columns)", len(soakColumns)+1)
	}
	var out [][]float64
	for i, rec := range recs[1:] {
		if len(rec) != len(soakColumns)+1 {
			return nil, fmt.Errorf("row %d: %d columns", i+2, len(rec))
		}
		row := make([]float64, len(rec))
		for j, v := range rec {
			if row[j], err = strconv.ParseFloat(v, 64); err != nil {
				return nil, fmt.Errorf("row %d: %w", i+2, err)
			}
		}
		out = append(out, row)
	}
	return out, nil
}
