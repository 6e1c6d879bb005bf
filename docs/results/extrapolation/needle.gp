set terminal pngcairo size 1240,1060 font 'sans,11'
set output '.needle.png.tmp'
set grid
set key outside right top
unset grid
unset key
set cbrange [0:1]
set palette defined (0 '#fff7ec', 0.5 '#fdbb84', 1 '#41ab5d')
unset colorbox
set xtics ('1x' 0, '2x' 1, '4x' 2, '8x' 3, '16x' 4)
set ytics ('0' 0, '0.25' 1, '0.5' 2, '0.75' 3, '1' 4)
set xrange [-0.5:4.5]
set yrange [-0.5:4.5]
set xlabel 'length (x training context 32)' font ',9'
set ylabel 'needle depth' font ',9'
set multiplot layout 4,4 title 'needle retrieval: exact-match accuracy (%)'
set title 'nope'
plot 'needle_nope.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'rope'
plot 'needle_rope.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'rope + pi'
plot 'needle_rope_pi.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'rope + ntk'
plot 'needle_rope_ntk.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'rope + dynamic-ntk'
plot 'needle_rope_dynamic-ntk.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'rope + yarn'
plot 'needle_rope_yarn.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'alibi'
plot 'needle_alibi.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'fox'
plot 'needle_fox.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'grape-m'
plot 'needle_grape-m.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'grape-m + pi'
plot 'needle_grape-m_pi.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'grape-m + ntk'
plot 'needle_grape-m_ntk.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'grape-m + dynamic-ntk'
plot 'needle_grape-m_dynamic-ntk.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'grape-m + yarn'
plot 'needle_grape-m_yarn.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'grape-ap'
plot 'needle_grape-ap.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'hdd-rope'
plot 'needle_hdd-rope.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
set title 'tape'
plot 'needle_tape.dat' using 1:2:3 with image, '' using 1:2:4 with labels font ',9'
unset multiplot
